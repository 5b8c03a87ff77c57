//! Secrets kept out of what a node shows: the password of a URL in logs and error messages (the
//! effective configuration at start, the PostgreSQL store's messages).

use url::Url;

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`; a URL without a password
/// comes back as written.
///
/// The URL parser decides where the credentials end (the last `@` of the authority), so a
/// password holding an unescaped `@` is hidden whole and an `@` in the query hides nothing.
/// PostgreSQL takes URLs the parser refuses (several hosts: `postgres://u:pw@h1:5432,h2:5432/db`;
/// a bad port, reported by the store): for those, everything from `://` to the last `@` before
/// the query is credentials, erring on hiding too much. A `key=value` connection string is shown
/// as written.
pub fn redact_url(text: &str) -> String {
    match Url::parse(text) {
        Ok(mut url) if url.password().is_some() => match url.set_password(Some("***")) {
            Ok(()) => url.into(),
            Err(()) => redact_unparsed(text),
        },
        Ok(_) => text.to_string(),
        Err(_) => redact_unparsed(text),
    }
}

fn redact_unparsed(text: &str) -> String {
    let Some(scheme_end) = text.find("://").map(|at| at + 3) else { return text.to_string() };
    let before_query = text.find(['?', '#']).unwrap_or(text.len());
    let Some(at) = text[..before_query].rfind('@').filter(|&at| at > scheme_end) else {
        return text.to_string();
    };
    match text[scheme_end..at].find(':') {
        Some(colon) => format!("{}:***{}", &text[..scheme_end + colon], &text[at..]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden_and_nothing_else() {
        let cases = [
            ("postgres://u:pw@h/db", "postgres://u:***@h/db"),
            ("postgresql://u:pw@h:5432/db?sslmode=require", "postgresql://u:***@h:5432/db?sslmode=require"),
            ("postgres://u:pw@h", "postgres://u:***@h"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            ("postgres://h/db", "postgres://h/db"),
            // An unescaped `@` in the password: the whole password is hidden (config's own
            // redactor showed `postgres://u:***@ss@h/db`).
            ("postgres://u:p@ss@h/db", "postgres://u:***@h/db"),
            // An `@` in the query is not the end of credentials (the store's own redactor showed
            // `postgres://u:***@b`, and `postgres://h:***@b` for the second).
            ("postgres://u:pw@h/db?application_name=a@b", "postgres://u:***@h/db?application_name=a@b"),
            ("postgres://h:5432/db?application_name=a@b", "postgres://h:5432/db?application_name=a@b"),
            // Refused by the URL parser, taken by PostgreSQL or reported by the store.
            ("postgres://u:pw@h1:5432,h2:5432/db", "postgres://u:***@h1:5432,h2:5432/db"),
            ("postgres://u:pw@h:port/db", "postgres://u:***@h:port/db"),
            ("postgres://u:pa/ss@h/db", "postgres://u:***@h/db"),
            ("host=h user=u dbname=db", "host=h user=u dbname=db"),
            ("", ""),
        ];
        for (text, want) in cases {
            assert_eq!(redact_url(text), want, "{text}");
        }
    }
}
