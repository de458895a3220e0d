//! A worker's local group map: group -> member connections, with the reverse (member -> groups)
//! kept on each `Conn`. A group exists only while it has members, so the map is cleaned
//! completely whenever connections leave, whatever the cause (the seed leaks here).

use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use slab::Slab;

/// Index of a group in the worker's slab; valid while the group has members.
pub type GroupId = usize;

struct Group {
    name: Rc<str>,
    /// Slab keys of the member connections.
    members: HashSet<usize>,
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
    pub fn join(&mut self, name: &str, conn: usize) -> Joined {
        let (id, first) = match self.by_name.get(name) {
            Some(&id) => (id, false),
            None => {
                let name: Rc<str> = Rc::from(name);
                let id = self.groups.insert(Group { name: name.clone(), members: HashSet::new() });
                self.by_name.insert(name, id);
                (id, true)
            }
        };
        if self.groups[id].members.insert(conn) {
            self.memberships += 1;
            Joined::New { id, first }
        } else {
            Joined::AlreadyMember
        }
    }

    /// Removes `conn` from group `id`. Returns the group's name when it became empty (and was
    /// removed), so the worker can unsubscribe.
    pub fn leave(&mut self, id: GroupId, conn: usize) -> Option<Rc<str>> {
        let group = self.groups.get_mut(id)?;
        if group.members.remove(&conn) {
            self.memberships -= 1;
        }
        if !group.members.is_empty() {
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
}
