//! Fault injection for the system tests: `OUTPOST_TEST_FAILPOINTS=name,name` in a node's environment
//! makes [`hit`] true for those names. Compiled into debug builds only: a release build always
//! answers `false`, so no environment variable can make a production node misbehave.

/// Whether the failpoint `name` is switched on (debug builds only).
pub fn hit(name: &str) -> bool {
    #[cfg(debug_assertions)]
    {
        static NAMES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
        NAMES
            .get_or_init(|| {
                std::env::var("OUTPOST_TEST_FAILPOINTS")
                    .unwrap_or_default()
                    .split(',')
                    .map(|n| n.trim().to_string())
                    .filter(|n| !n.is_empty())
                    .collect()
            })
            .iter()
            .any(|n| n == name)
    }
    #[cfg(not(debug_assertions))]
    {
        let _ = name;
        false
    }
}
