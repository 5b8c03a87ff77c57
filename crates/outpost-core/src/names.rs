//! Names of queues, routes, consumers and nodes: `[A-Za-z0-9._-]{1,128}` (CONTRACT section 3).

/// The longest name outpost accepts.
pub const MAX_NAME_BYTES: usize = 128;

/// Checks a queue, route, consumer or node name; the error says what is wrong.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("name is empty: use 1 to 128 of A-Z a-z 0-9 . _ -".into());
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!("name is {} characters long: the limit is {MAX_NAME_BYTES}", name.len()));
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("name {name:?} contains {bad:?}: use only A-Z a-z 0-9 . _ -"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["orders", "a", "A.b_c-9", &"x".repeat(128)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "ä", "a/b", &"x".repeat(129), "q%20"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
