//! The loader end to end: precedence, defaults, and errors that name origin, key and problem.

use std::path::PathBuf;
use std::time::Duration;

use super::*;

fn write(text: &str) -> (tempfile_path::TempPath, Flags) {
    let path = tempfile_path::TempPath::new(text);
    let flags = Flags { config_file: Some(path.0.clone()), ..Flags::default() };
    (path, flags)
}

mod tempfile_path {
    pub struct TempPath(pub std::path::PathBuf);
    impl TempPath {
        pub fn new(text: &str) -> Self {
            static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("outpost-config-test-{}-{n}.toml", std::process::id()));
            std::fs::write(&path, text).unwrap();
            TempPath(path)
        }
    }
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[test]
fn defaults_without_any_config() {
    let c = Config::load_from(Role::Edge, &Flags::default(), &[]).unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:7400");
    assert_eq!(c.data_dir, PathBuf::from("./outpost-data/edge"));
    let urls: Vec<_> = c.upstreams.iter().map(|u| u.url.as_str()).collect();
    assert_eq!(urls, [DEFAULT_CENTRAL_URL], "an edge with no upstream uses the default central");
    assert_eq!(c.connectivity.ping_interval, Duration::from_secs(300));
    assert_eq!(c.limits.max_message_bytes, 1 << 20);
    assert!(c.auth.is_none());
    let c = Config::load_from(Role::Central, &Flags::default(), &[]).unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:7401");
    assert_eq!(c.data_dir, PathBuf::from("./outpost-data/central"));
    assert!(c.upstreams.is_empty());
}

#[test]
fn an_edge_can_say_it_has_no_upstream() {
    let env = vec![("OUTPOST_UPSTREAM".to_string(), "none".to_string())];
    let c = Config::load_from(Role::Edge, &Flags::default(), &env).unwrap();
    assert!(c.upstreams.is_empty());
    let (_f, flags) = write("upstream = \"none\"\n");
    assert!(Config::load_from(Role::Edge, &flags, &[]).unwrap().upstreams.is_empty());
    let e = Config::load_from(Role::Edge, &flags.clone(), &[("OUTPOST_UPSTREAM".into(), "nope".into())])
        .unwrap_err();
    assert_eq!(e.key, "upstream", "{e}");
    // --central wins over "none" from the environment.
    let flags = Flags { centrals: vec!["http://a:1".into()], ..Flags::default() };
    assert_eq!(Config::load_from(Role::Edge, &flags, &env).unwrap().upstreams.len(), 1);
}

#[test]
fn wan_keys_forwarding_queues_and_route_windows() {
    let c = Config::load_from(Role::Edge, &Flags::default(), &[]).unwrap();
    assert_eq!(c.forwarding.compression, Compression::Zstd);
    assert_eq!(c.forwarding.max_bandwidth_bytes_per_second, 0);
    assert_eq!(c.queue_priority("anything"), DEFAULT_QUEUE_PRIORITY);
    assert_eq!(c.queue_message_ttl("anything"), None);
    let (_f, flags) = write(
        "[limits]\nmessage_ttl = \"1h\"\n[forwarding]\ncompression = \"none\"\nmax_bandwidth = \"256KiB\"\n\
         [[queue]]\nname = \"alarms\"\npriority = 0\nmessage_ttl = \"5m\"\n\
         [[queue]]\nname = \"audit\"\nmessage_ttl = \"0s\"\n\
         [[route]]\nname = \"r\"\nqueue = \"alarms\"\nurls = [\"http://x/\"]\nmax_in_flight = 32\nbatch = 100\n",
    );
    let c = Config::load_from(Role::Edge, &flags, &[]).unwrap();
    assert_eq!(c.forwarding.compression, Compression::None);
    assert_eq!(c.forwarding.max_bandwidth_bytes_per_second, 256 << 10);
    assert_eq!(c.queue_priority("alarms"), 0);
    assert_eq!(c.queue_priority("audit"), DEFAULT_QUEUE_PRIORITY);
    assert_eq!(c.queue_message_ttl("alarms"), Some(Duration::from_secs(300)));
    assert_eq!(c.queue_message_ttl("audit"), None, "0s: never, whatever limits says");
    assert_eq!(c.queue_message_ttl("other"), Some(Duration::from_secs(3600)));
    assert_eq!((c.routes[0].max_in_flight.get(), c.routes[0].batch.get()), (32, 100));
    for (text, key) in [
        ("[forwarding]\ncompression = \"gzip\"\n", "forwarding.compression"),
        ("[forwarding]\nmax_bandwidth = 100\n", "forwarding.max_bandwidth"),
        ("[[queue]]\nname = \"q\"\npriority = 10\n", "queue[0].priority"),
        ("[[queue]]\nname = \"q\"\n[[queue]]\nname = \"q\"\n", "queue[1].name"),
        (
            "[[route]]\nname = \"r\"\nqueue = \"q\"\nurls = [\"http://x/\"]\nmax_in_flight = 0\n",
            "route[0].max_in_flight",
        ),
        (
            "[[route]]\nname = \"r\"\nqueue = \"q\"\nurls = [\"http://x/\"]\nbatch = 100000\n",
            "route[0].batch",
        ),
        (
            "[[route]]\nname = \"r\"\nqueue = \"q\"\nurls = [\"http://x/\"]\nservice_down = [\"dns\"]\n",
            "route[0].service_down",
        ),
        (
            "[[route]]\nname = \"r\"\nqueue = \"q\"\nurls = [\"http://x/\"]\npoison = \"http:400,http:600\"\n",
            "route[0].poison",
        ),
    ] {
        let (_f, flags) = write(text);
        let error = Config::load_from(Role::Edge, &flags, &[]).unwrap_err();
        assert_eq!(error.key, key, "{text}: {error}");
    }
}

#[test]
fn precedence_file_then_env_then_flags() {
    let (_f, mut flags) =
        write("listen = \"127.0.0.1:9000\"\n[connectivity]\nping_interval = \"10s\"\nmissed_pings = 5\n");
    let c = Config::load_from(Role::Edge, &flags, &[]).unwrap();
    assert_eq!(c.listen.port(), 9000);
    assert_eq!(c.connectivity.missed_pings, 5);
    flags.listen = Some("127.0.0.1:9001".into());
    let env = vec![
        ("OUTPOST_LISTEN".to_string(), "127.0.0.1:9002".to_string()),
        ("OUTPOST_CONNECTIVITY__PING_INTERVAL".to_string(), "2s".to_string()),
        ("OUTPOST_CONNECTIVITY__MISSED_PINGS".to_string(), "7".to_string()),
        ("OUTPOST_URL".to_string(), "ignored by nodes".to_string()),
    ];
    let c = Config::load_from(Role::Edge, &flags, &env).unwrap();
    assert_eq!(c.listen.port(), 9001);
    assert_eq!(c.connectivity.ping_interval, Duration::from_secs(2));
    assert_eq!(c.connectivity.missed_pings, 7);
}

#[test]
fn errors_name_origin_key_and_problem() {
    type Case<'a> = (&'a str, Vec<(String, String)>, &'a str, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            "[connectivity]\nping_interval = \"5x\"\n",
            vec![],
            ".toml",
            "connectivity.ping_interval",
            "unknown unit",
        ),
        ("bogus = 1\n", vec![], ".toml", "", "unknown field `bogus`"),
        ("[limits]\nmax_batch_messages = 0\n", vec![], ".toml", "limits.max_batch_messages", "at least 1"),
        ("listen = \"nowhere\"\n", vec![], ".toml", "listen", "not an address"),
        (
            "",
            vec![("OUTPOST_LIMITS__MAX_STORE_BYTES".into(), "lots".into())],
            "OUTPOST_LIMITS__MAX_STORE_BYTES",
            "limits.max_store_bytes",
            "invalid size",
        ),
        ("", vec![("OUTPOST_NOPE".into(), "1".into())], "OUTPOST_NOPE", "nope", "unknown field `nope`"),
        (
            "[[route]]\nname = \"r\"\nqueue = \"q\"\nurls = [\"ftp://x\"]\n",
            vec![],
            ".toml",
            "route[0].urls",
            "not an http",
        ),
        (
            "[[upstream]]\nurl = \"http://x\"\ntrigger = \"maybe\"\n",
            vec![],
            ".toml",
            "upstream[0].trigger",
            "true or false",
        ),
    ];
    for (file, env, origin, key, problem) in cases {
        let (_f, flags) = write(file);
        let e = Config::load_from(Role::Edge, &flags, &env).unwrap_err();
        assert!(e.origin.contains(origin), "{file}: origin {e}");
        if !key.is_empty() {
            assert_eq!(e.key, key, "{file}: {e}");
        }
        assert!(e.to_string().contains(problem), "{file}: {e}");
    }
}

#[test]
fn errors_never_name_internal_types() {
    for text in
        ["limits = 5\n", "failover = \"x\"\n", "[[route]]\nname = 1\n", "upstream = [1]\n", "tls = 3\n"]
    {
        let (_f, flags) = write(text);
        let e = Config::load_from(Role::Edge, &flags, &[]).unwrap_err().to_string();
        assert!(!e.contains("Raw") && !e.contains("struct"), "{text:?}: {e}");
    }
}

#[test]
fn centrals_flag_sets_ordered_upstreams() {
    let flags = Flags { centrals: vec!["http://a:1".into(), "http://b:2/".into()], ..Flags::default() };
    let c = Config::load_from(Role::Edge, &flags, &[]).unwrap();
    let urls: Vec<_> = c.upstreams.iter().map(|u| u.url.as_str()).collect();
    assert_eq!(urls, ["http://a:1", "http://b:2"]);
    assert!(c.upstreams.iter().all(|u| u.trigger));
}

#[test]
fn role_specific_sections_are_checked() {
    let (_f, flags) = write("[[upstream]]\nurl = \"http://x:1\"\n");
    assert!(Config::load_from(Role::Central, &flags, &[])
        .unwrap_err()
        .to_string()
        .contains("a central has no upstream"));
    let (_f, flags) = write("postgres = \"postgres://x@y/z\"\n");
    assert!(Config::load_from(Role::Edge, &flags, &[]).is_err());
}

#[test]
fn secrets_are_redacted() {
    let (_f, flags) = write("[auth]\nclient_tokens = [\"sekrit1\"]\nadmin_tokens = [\"sekrit2\"]\n");
    let c = Config::load_from(
        Role::Central,
        &Flags { postgres: Some("postgres://u:pw@h/db".into()), ..flags },
        &[],
    )
    .unwrap();
    let summary = c.redacted_summary();
    assert!(!summary.contains("sekrit") && !summary.contains(":pw@"), "{summary}");
    assert!(summary.contains("postgres://u:***@h/db"));
}

#[test]
fn route_error_classes_parse_and_refuse() {
    let cases: [(&str, Option<ErrorClass>); 9] = [
        ("connect", Some(ErrorClass::Connect)),
        ("timeout", Some(ErrorClass::Timeout)),
        ("reset", Some(ErrorClass::Reset)),
        ("http:503", Some(ErrorClass::Http(503))),
        ("http:100", Some(ErrorClass::Http(100))),
        ("http:600", None),
        ("http:", None),
        ("HTTP:500", None),
        ("dns", None),
    ];
    for (text, want) in cases {
        assert_eq!(text.parse::<ErrorClass>().ok(), want, "{text}");
        if let Some(class) = want {
            assert_eq!(class.to_string(), text, "written back as read");
        }
    }
}

#[test]
fn routes_default_to_typed_classes_and_bounds() {
    let (_f, flags) = write("[[route]]\nname = \"r\"\nqueue = \"q\"\nurls = [\"http://x/\"]\n");
    let c = Config::load_from(Role::Edge, &flags, &[]).unwrap();
    let route = &c.routes[0];
    assert_eq!(route.service_down, ErrorClass::DEFAULT_SERVICE_DOWN);
    assert_eq!(route.poison, ErrorClass::DEFAULT_POISON);
    assert_eq!((route.max_attempts.get(), route.max_in_flight.get(), route.batch.get()), (10, 1, 1));
    let (_f, flags) = write(
        "[[route]]\nname = \"r\"\nqueue = \"q\"\nurls = [\"http://x/\"]\nservice_down = \"reset, http:500\"\npoison = []\n",
    );
    let c = Config::load_from(Role::Edge, &flags, &[]).unwrap();
    assert_eq!(c.routes[0].service_down, [ErrorClass::Reset, ErrorClass::Http(500)]);
    assert!(c.routes[0].poison.is_empty());
}
