//! The glob matcher of group rules (`[[groups]] pattern`) and of token claims (`groups`,
//! `publish`): `*` matches any run of characters, `.` included (so `user.*` covers
//! `user.42.feed`), `?` exactly one character, every other character itself. No escapes, no
//! classes: group names are the application's own, and a small language is one nobody gets
//! wrong. Runs in any worker, on every join and publish a rule or token governs.

/// Whether `name` matches `pattern`.
///
/// The classic linear-backtracking algorithm: on a mismatch, go back to the last `*` and let it
/// swallow one more character. Only the last `*` needs remembering (a later star can absorb
/// whatever an earlier one would have), so the cost is O(len(pattern) × len(name)) at worst and
/// nothing is allocated. Works on `char`s, so `?` is one character, not one byte.
pub fn matches(pattern: &str, name: &str) -> bool {
    let p: &[u8] = pattern.as_bytes();
    let n: &[u8] = name.as_bytes();
    let (mut pi, mut ni) = (0usize, 0usize);
    // (index in pattern after the star, index in name the star is matched up to)
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() {
            match p[pi] {
                b'*' => {
                    pi += 1;
                    star = Some((pi, ni));
                    continue;
                }
                b'?' => {
                    pi += 1;
                    ni += char_len(n[ni]);
                    continue;
                }
                c if c == n[ni] => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                _ => {}
            }
        }
        // Mismatch (or pattern used up): widen the last star by one character.
        match star {
            Some((after_star, matched_to)) => {
                let next = matched_to + char_len(n[matched_to]);
                star = Some((after_star, next));
                pi = after_star;
                ni = next;
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Bytes of the UTF-8 character starting with `first` (1 for a stray continuation byte, which
/// cannot start a `&str` character anyway).
fn char_len(first: u8) -> usize {
    match first {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

/// Whether any of `patterns` matches `name`.
pub fn any_matches<S: AsRef<str>>(patterns: &[S], name: &str) -> bool {
    patterns.iter().any(|p| matches(p.as_ref(), name))
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn stars_questions_and_literals() {
        assert!(matches("*", ""));
        assert!(matches("*", "room.42"));
        assert!(matches("user.*", "user.42.feed"), "* crosses dots");
        assert!(!matches("user.*", "users.42"));
        assert!(matches("room.??", "room.42"));
        assert!(!matches("room.??", "room.4"));
        assert!(matches("a*b*c", "aXXbYYc"));
        assert!(!matches("a*b*c", "aXXbYY"));
        assert!(matches("é?", "éà"), "? is one character");
        assert!(matches("**x", "x"));
        assert!(!matches("", "x"));
        assert!(matches("", ""));
    }
}
