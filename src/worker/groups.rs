//! A worker's local group map: group -> member connections, with the reverse (member -> groups)
//! kept on each `Conn`. A group exists only while it has members, so the map is cleaned
//! completely whenever connections leave, whatever the cause (the seed leaks here).

use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use slab::Slab;

use super::numbered::NumberedGroup;

/// Index of a group in the worker's slab; valid while the group has members.
pub type GroupId = usize;

struct Group {
    name: Rc<str>,
    /// Slab keys of the seed-protocol member connections.
    members: HashSet<usize>,
    /// The protocol-2 members and the group's position, once one has joined.
    numbered: Option<Box<NumberedGroup>>,
}

#[derive(Default)]
pub struct Groups {
    by_name: HashMap<Rc<str>, GroupId>,
    groups: Slab<Group>,
    memberships: usize,
}

/// Result of a join.
#[derive(Debug, PartialEq, Eq)]
pub enum Joined {
    /// Newly a member; `first` when the group was created, so the worker must subscribe.
    New {
        id: GroupId,
        first: bool,
    },
    AlreadyMember,
}

impl Groups {
    /// Makes `conn` a seed-protocol member of `name`.
    pub fn join(&mut self, name: &str, conn: usize) -> Joined {
        let (id, first) = self.entry(name);
        if self.groups[id].numbered.as_ref().is_some_and(|n| n.contains(conn)) {
            return Joined::AlreadyMember;
        }
        if self.groups[id].members.insert(conn) {
            self.memberships += 1;
            Joined::New { id, first }
        } else {
            Joined::AlreadyMember
        }
    }

    /// Makes `conn` a protocol-2 member of `name`, waiting for the answer to `request`.
    pub fn join_numbered(&mut self, name: &str, conn: usize, request: u64, buffer_max: usize) -> Joined {
        let (id, first) = self.entry(name);
        let group = &mut self.groups[id];
        let numbered = group.numbered.get_or_insert_with(|| Box::new(NumberedGroup::new(name, buffer_max)));
        if numbered.contains(conn) || group.members.contains(&conn) {
            return Joined::AlreadyMember;
        }
        numbered.add_pending(conn, request);
        self.memberships += 1;
        Joined::New { id, first }
    }

    /// The group named `name`, made if missing; `true` when it was.
    fn entry(&mut self, name: &str) -> (GroupId, bool) {
        match self.by_name.get(name) {
            Some(&id) => (id, false),
            None => {
                let name: Rc<str> = Rc::from(name);
                let id = self.groups.insert(Group { name: name.clone(), members: HashSet::new(), numbered: None });
                self.by_name.insert(name, id);
                (id, true)
            }
        }
    }

    /// Makes `conn` a numbered member of `name` taking the bare message (a seed-protocol
    /// connection handed over by a reload), waiting for the answer to `request`.
    pub fn join_numbered_bare(&mut self, name: &str, conn: usize, request: u64, buffer_max: usize) -> Joined {
        let joined = self.join_numbered(name, conn, request, buffer_max);
        if let Joined::New { id, .. } = joined {
            if let Some(numbered) = self.groups[id].numbered.as_mut() {
                numbered.add_pending_bare(conn, request);
            }
        }
        joined
    }

    /// Whether `conn` is a seed-protocol member of group `id` (not a numbered one).
    pub fn is_seed_member(&self, id: GroupId, conn: usize) -> bool {
        self.groups.get(id).is_some_and(|g| g.members.contains(&conn))
    }

    /// The protocol-2 side of group `id`, if it has protocol-2 members.
    pub fn numbered(&self, id: GroupId) -> Option<&NumberedGroup> {
        self.groups.get(id)?.numbered.as_deref()
    }

    pub fn numbered_mut(&mut self, id: GroupId) -> Option<&mut NumberedGroup> {
        self.groups.get_mut(id)?.numbered.as_deref_mut()
    }

    /// Every group with protocol-2 members.
    pub fn numbered_ids(&self) -> Vec<GroupId> {
        self.groups.iter().filter(|(_, g)| g.numbered.is_some()).map(|(id, _)| id).collect()
    }

    /// Connections in `name`, seed and protocol-2 members alike (the API's group count).
    pub fn member_count(&self, name: &str) -> usize {
        let Some(group) = self.lookup(name).and_then(|id| self.groups.get(id)) else { return 0 };
        group.members.len() + group.numbered.as_ref().map_or(0, |n| n.len())
    }

    /// Protocol-2 memberships, for `status`.
    pub fn numbered_memberships(&self) -> usize {
        self.groups.iter().filter_map(|(_, g)| g.numbered.as_ref()).map(|n| n.len()).sum()
    }

    /// Removes `conn` from group `id`. Returns the group's name when it became empty (and was
    /// removed), so the worker can unsubscribe.
    pub fn leave(&mut self, id: GroupId, conn: usize) -> Option<Rc<str>> {
        let group = self.groups.get_mut(id)?;
        if group.members.remove(&conn) {
            self.memberships -= 1;
        } else if let Some(numbered) = &mut group.numbered {
            if numbered.contains(conn) {
                numbered.remove(conn);
                self.memberships -= 1;
            }
            if numbered.is_empty() {
                group.numbered = None;
            }
        }
        if !group.members.is_empty() || group.numbered.is_some() {
            return None;
        }
        let group = self.groups.remove(id);
        self.by_name.remove(&group.name);
        Some(group.name)
    }

    pub fn lookup(&self, name: &str) -> Option<GroupId> {
        self.by_name.get(name).copied()
    }

    pub fn members(&self, id: GroupId) -> impl Iterator<Item = usize> + '_ {
        self.groups.get(id).into_iter().flat_map(|g| g.members.iter().copied())
    }

    pub fn name_rc(&self, id: GroupId) -> Option<Rc<str>> {
        self.groups.get(id).map(|g| g.name.clone())
    }

    pub fn name(&self, id: GroupId) -> Option<&str> {
        self.groups.get(id).map(|g| &*g.name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(|k| &**k)
    }

    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    pub fn memberships(&self) -> usize {
        self.memberships
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_vanish_with_their_last_member() {
        let mut g = Groups::default();
        let Joined::New { id, first: true } = g.join("a", 1) else { panic!() };
        assert_eq!(g.join("a", 2), Joined::New { id, first: false });
        assert_eq!(g.join("a", 2), Joined::AlreadyMember);
        assert_eq!(g.leave(id, 1), None);
        assert_eq!(g.leave(id, 2).as_deref(), Some("a"));
        assert!(g.is_empty() && g.lookup("a").is_none() && g.memberships() == 0);
    }

    #[test]
    fn protocol_2_members_keep_the_group_and_its_position_alive() {
        let mut g = Groups::default();
        let Joined::New { id, first: true } = g.join("a", 1) else { panic!() };
        assert_eq!(g.join_numbered("a", 2, 9, 100), Joined::New { id, first: false });
        assert_eq!(g.join_numbered("a", 2, 10, 100), Joined::AlreadyMember);
        assert_eq!(g.join("a", 2), Joined::AlreadyMember);
        assert_eq!(g.memberships(), 2);
        assert_eq!(g.leave(id, 1), None);
        assert_eq!(g.numbered(id).map(|n| n.pending_request(2)), Some(Some(9)));
        assert_eq!(g.leave(id, 2).as_deref(), Some("a"));
        assert!(g.is_empty() && g.memberships() == 0);
    }
}
