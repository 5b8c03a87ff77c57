//! The watcher with real child processes: restart after kill -9, crash loops, readiness timeout, clean stop.

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use outpost_ha::{run_watcher, HaSettings, HA_LOG_FILE_NAME};

/// Runs `run_watcher` in this process on a thread, failing the test if it has not returned
/// within `timeout`. Returns the exit code and how long it ran.
fn run_watcher_in_process(
    settings: HaSettings,
    program: PathBuf,
    args: Vec<OsString>,
    log_path: &Path,
    timeout: Duration,
) -> (i32, Duration) {
    let (done_sender, done) = mpsc::channel();
    let log_path = log_path.to_path_buf();
    let started = Instant::now();
    std::thread::spawn(move || {
        let code = run_watcher(&settings, &program, &args, &log_path);
        let _ = done_sender.send(code);
    });
    let code = done.recv_timeout(timeout).expect("the watcher returns in time");
    (code, started.elapsed())
}

#[test]
fn kill_9_of_the_child_starts_a_new_ready_child_after_restart_delay() {
    let _serial = serial();
    let data_dir = tempfile::tempdir().unwrap();
    let log_path = data_dir.path().join(HA_LOG_FILE_NAME);
    let settings = fast_settings();
    let restart_delay = settings.restart_delay;
    let (program, args) = shell(READY_THEN_SLEEP);
    let mut watcher = ForkedWatcher::start(settings, program, args, log_path.clone());

    assert!(wait_until(Duration::from_secs(5), || count_code(&log_path, "HA06") == 1), "first child ready");
    let first_pid = started_pids(&log_path)[0];
    let killed_at = Instant::now();
    kill(first_pid, Signal::SIGKILL).unwrap();

    assert!(
        wait_until(Duration::from_secs(5), || count_code(&log_path, "HA06") == 2),
        "second child ready: {:#?}",
        read_log(&log_path)
    );
    let back_after = killed_at.elapsed();
    let margin = Duration::from_secs(2);
    assert!(back_after >= restart_delay, "restarted before restart_delay: {back_after:?}");
    assert!(back_after < restart_delay + margin, "restart took {back_after:?}");

    let pids = started_pids(&log_path);
    assert_eq!(pids.len(), 2);
    assert_ne!(pids[1], first_pid);
    assert!(!process_exists(first_pid) && process_group_gone_soon(first_pid));
    assert!(process_exists(pids[1]));

    let log = read_log(&log_path);
    let ended = lines_with_code(&log, "HA07");
    assert_eq!(ended.len(), 1, "{log:#?}");
    assert!(ended[0].text.starts_with("child ended signal=SIGKILL"), "{:?}", ended[0]);
    assert_eq!(field(&ended[0].text, "pid"), Some(first_pid.as_raw().into()));
    let restarting = lines_with_code(&log, "HA08");
    assert_eq!(restarting.len(), 1);
    assert_eq!(restarting[0].text, "restarting child in 100ms");

    watcher.signal(Signal::SIGTERM);
    assert_eq!(watcher.wait_exit(Duration::from_secs(10)), Some(0));
    let codes: Vec<String> = read_log(&log_path).into_iter().map(|line| line.code).collect();
    assert_eq!(
        codes,
        [
            "HA01", "HA02", "HA03", "HA04", "HA05", "HA06", "HA07", "HA08", "HA03", "HA04", "HA05", "HA06",
            "HA10", "HA07"
        ]
    );
    assert!(!process_exists(pids[1]) && process_group_gone_soon(pids[1]));
}

#[test]
fn a_child_that_dies_at_once_is_restarted_with_doubling_delays_until_the_limit() {
    let _serial = serial();
    let data_dir = tempfile::tempdir().unwrap();
    let log_path = data_dir.path().join(HA_LOG_FILE_NAME);
    let settings = HaSettings {
        restart_delay: Duration::from_millis(20),
        restart_delay_max: Duration::from_millis(80),
        max_restarts: 5,
        // A child that dies before its readiness notice must be noticed at once, not after this.
        ready_timeout: Duration::from_secs(30),
        ..fast_settings()
    };
    let (program, args) = shell(EXIT_3);

    let (code, ran_for) = run_watcher_in_process(settings, program, args, &log_path, Duration::from_secs(20));

    assert_eq!(code, 1);
    assert!(ran_for < Duration::from_secs(5), "child deaths were noticed late: {ran_for:?}");
    let log = read_log(&log_path);
    let delays: Vec<&str> = lines_with_code(&log, "HA08").iter().map(|line| line.text.as_str()).collect();
    assert_eq!(
        delays,
        [
            "restarting child in 20ms",
            "restarting child in 40ms",
            "restarting child in 80ms",
            "restarting child in 80ms",
            "restarting child in 80ms",
        ]
    );
    let ended = lines_with_code(&log, "HA07");
    assert_eq!(ended.len(), 6, "the first start plus max_restarts restarts");
    assert!(ended.iter().all(|line| line.text.starts_with("child ended code=3 pid=")), "{ended:#?}");
    assert_eq!(lines_with_code(&log, "HA04").len(), 6);
    assert!(lines_with_code(&log, "HA06").is_empty());
    let last = log.last().unwrap();
    assert_eq!(last.code, "HA09");
    assert!(last.text.starts_with("restart limit reached, giving up"), "{last:?}");
    for pid in started_pids(&log_path) {
        assert!(!process_exists(pid), "child {pid} left behind");
    }
}

#[test]
fn a_child_that_never_becomes_ready_is_killed_and_restarted() {
    let _serial = serial();
    let data_dir = tempfile::tempdir().unwrap();
    let log_path = data_dir.path().join(HA_LOG_FILE_NAME);
    let ready_timeout = Duration::from_millis(300);
    let settings = HaSettings {
        ready_timeout,
        restart_delay: Duration::from_millis(50),
        max_restarts: 1,
        ..fast_settings()
    };
    let (program, args) = shell(NEVER_READY);

    let (code, _) = run_watcher_in_process(settings, program, args, &log_path, Duration::from_secs(20));

    assert_eq!(code, 1, "gives up after max_restarts=1");
    let pids = started_pids(&log_path);
    assert_eq!(pids.len(), 2, "the first child and one restart");
    let log = read_log(&log_path);
    let ended = lines_with_code(&log, "HA07");
    assert_eq!(ended.len(), 2);
    for (line, pid) in ended.iter().zip(&pids) {
        assert!(line.text.starts_with("child ended signal=SIGKILL"), "{line:?}");
        assert!(line.text.contains("not ready within 300ms"), "{line:?}");
        assert_eq!(field(&line.text, "pid"), Some(pid.as_raw().into()));
        let uptime = Duration::from_millis(field(&line.text, "uptime").unwrap() as u64);
        assert!(uptime >= ready_timeout && uptime < ready_timeout + Duration::from_secs(2), "{line:?}");
        assert!(!process_exists(*pid) && process_group_gone_soon(*pid));
    }
    assert_eq!(lines_with_code(&log, "HA08")[0].text, "restarting child in 50ms");
    assert!(lines_with_code(&log, "HA06").is_empty());
    assert_eq!(log.last().unwrap().code, "HA09");
}

#[test]
fn sigterm_to_the_watcher_stops_the_child_and_its_group_cleanly() {
    let _serial = serial();
    let data_dir = tempfile::tempdir().unwrap();
    let log_path = data_dir.path().join(HA_LOG_FILE_NAME);
    let helper_pid_file = data_dir.path().join("helper.pid");
    // The child leaves a helper in its process group (as a node's subprocess would) and, on
    // SIGTERM, exits 0 without stopping it: the watcher must clean the group up.
    let script = format!(
        r#"trap 'exit 0' TERM
sleep 1000 &
echo $! > '{}'
printf ready > "/dev/fd/$OUTPOST_HA_READY_FD"
wait"#,
        helper_pid_file.display()
    );
    let (program, args) = shell(&script);
    let mut watcher = ForkedWatcher::start(fast_settings(), program, args, log_path.clone());

    assert!(
        wait_until(Duration::from_secs(5), || count_code(&log_path, "HA06") == 1),
        "{:#?}",
        read_log(&log_path)
    );
    let child_pid = started_pids(&log_path)[0];
    let helper_pid = nix::unistd::Pid::from_raw(
        std::fs::read_to_string(&helper_pid_file).unwrap().trim().parse().unwrap(),
    );
    assert!(process_exists(helper_pid));
    assert_eq!(nix::unistd::getpgid(Some(helper_pid)).unwrap(), child_pid, "helper is in the child's group");

    let stop_sent = Instant::now();
    watcher.signal(Signal::SIGTERM);
    assert_eq!(watcher.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(
        stop_sent.elapsed() < Duration::from_secs(5),
        "the child stopped on SIGTERM, no grace period needed"
    );

    assert!(!process_exists(child_pid), "child {child_pid} survived");
    assert!(process_gone_soon(helper_pid), "helper {helper_pid} survived as an orphan");
    assert!(process_group_gone_soon(child_pid), "process group {child_pid} survived");

    let log = read_log(&log_path);
    let stop = lines_with_code(&log, "HA10");
    assert_eq!(stop.len(), 1);
    assert_eq!(stop[0].text, format!("stop requested, stopping child pid={child_pid}"));
    let ended = log.last().unwrap();
    assert_eq!(ended.code, "HA07");
    assert!(ended.text.starts_with(&format!("child ended code=0 pid={child_pid}")), "{ended:?}");
    assert!(lines_with_code(&log, "HA08").is_empty(), "a requested stop is not restarted");
}

#[test]
fn sigint_while_waiting_to_restart_exits_without_starting_a_child() {
    let _serial = serial();
    let data_dir = tempfile::tempdir().unwrap();
    let log_path = data_dir.path().join(HA_LOG_FILE_NAME);
    let settings = HaSettings { restart_delay: Duration::from_secs(30), ..fast_settings() };
    let (program, args) = shell(EXIT_3);
    let mut watcher = ForkedWatcher::start(settings, program, args, log_path.clone());

    assert!(wait_until(Duration::from_secs(5), || count_code(&log_path, "HA08") == 1));
    watcher.signal(Signal::SIGINT);
    assert_eq!(watcher.wait_exit(Duration::from_secs(5)), Some(0), "the 30 s delay was interrupted");

    let log = read_log(&log_path);
    assert_eq!(log.last().unwrap().code, "HA10");
    assert_eq!(lines_with_code(&log, "HA04").len(), 1);
}

#[test]
fn a_child_that_ignores_sigterm_is_killed_on_a_second_stop_request() {
    let _serial = serial();
    let data_dir = tempfile::tempdir().unwrap();
    let log_path = data_dir.path().join(HA_LOG_FILE_NAME);
    let script = r#"trap '' TERM; printf ready > "/dev/fd/$OUTPOST_HA_READY_FD"; while :; do sleep 1; done"#;
    let (program, args) = shell(script);
    let mut watcher = ForkedWatcher::start(fast_settings(), program, args, log_path.clone());

    assert!(wait_until(Duration::from_secs(5), || count_code(&log_path, "HA06") == 1));
    let child_pid = started_pids(&log_path)[0];
    watcher.signal(Signal::SIGTERM);
    assert!(wait_until(Duration::from_secs(5), || count_code(&log_path, "HA10") == 1));
    assert!(process_exists(child_pid), "still inside the grace period");
    watcher.signal(Signal::SIGINT); // an impatient operator's second Ctrl-C

    assert_eq!(watcher.wait_exit(Duration::from_secs(5)), Some(0));
    assert!(process_group_gone_soon(child_pid));
    let ended = read_log(&log_path).pop().unwrap();
    assert_eq!(ended.code, "HA07");
    assert!(ended.text.starts_with("child ended signal=SIGKILL"), "{ended:?}");
    assert!(ended.text.contains("stop requested again"), "{ended:?}");
}

#[test]
fn a_program_that_cannot_start_ends_in_the_restart_limit() {
    let _serial = serial();
    let data_dir = tempfile::tempdir().unwrap();
    let log_path = data_dir.path().join("not-yet-created").join(HA_LOG_FILE_NAME);
    let settings = HaSettings {
        restart_delay: Duration::from_millis(1),
        restart_delay_max: Duration::from_millis(2),
        max_restarts: 2,
        ..fast_settings()
    };

    let (code, _) = run_watcher_in_process(
        settings,
        PathBuf::from("/nonexistent/outpost"),
        vec![OsString::from("--child")],
        &log_path,
        Duration::from_secs(10),
    );

    assert_eq!(code, 1);
    let log = read_log(&log_path);
    let ended = lines_with_code(&log, "HA07");
    assert_eq!(ended.len(), 3);
    assert!(ended[0].text.contains("cannot run /nonexistent/outpost"), "{:?}", ended[0]);
    assert_eq!(log.last().unwrap().code, "HA09");
}

#[test]
fn the_log_is_appended_across_watcher_runs() {
    let _serial = serial();
    let data_dir = tempfile::tempdir().unwrap();
    let log_path = data_dir.path().join(HA_LOG_FILE_NAME);
    let settings = HaSettings { max_restarts: 0, ..fast_settings() };
    for _ in 0..2 {
        let (program, args) = shell(EXIT_3);
        let (code, _) =
            run_watcher_in_process(settings.clone(), program, args, &log_path, Duration::from_secs(10));
        assert_eq!(code, 1);
    }
    let log = read_log(&log_path);
    assert_eq!(lines_with_code(&log, "HA01").len(), 2);
    assert_eq!(lines_with_code(&log, "HA09").len(), 2);
    let command_line = &lines_with_code(&log, "HA03")[0].text;
    assert_eq!(command_line, "child command line: [/bin/sh -c \"exit 3\" outpost-test-child --child]");
}

#[test]
fn under_systemd_the_watcher_relays_readiness_pings_the_watchdog_and_hides_the_socket_from_the_child() {
    let _serial = serial();
    let data_dir = tempfile::tempdir().unwrap();
    let log_path = data_dir.path().join(HA_LOG_FILE_NAME);
    let socket_path = data_dir.path().join("notify.sock");
    let systemd = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    systemd.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The child must not see the notify variables: under --ha the watcher is the main process.
    let script = r#"[ -z "$NOTIFY_SOCKET$WATCHDOG_USEC" ] || exit 7
printf ready > "/dev/fd/$OUTPOST_HA_READY_FD"; exec sleep 1000"#;
    let (program, args) = shell(script);
    let socket = socket_path.to_str().unwrap();
    let env = [("NOTIFY_SOCKET", socket), ("WATCHDOG_USEC", "100000")];
    let mut watcher = ForkedWatcher::start_with_env(fast_settings(), program, args, log_path.clone(), &env);

    let mut received = Vec::new();
    let mut buffer = [0_u8; 64];
    let got_everything = wait_until(Duration::from_secs(5), || {
        let length = systemd.recv(&mut buffer).expect("a notification");
        received.push(String::from_utf8_lossy(&buffer[..length]).into_owned());
        received.iter().filter(|message| *message == "WATCHDOG=1").count() >= 3
            && received.iter().any(|message| message == "READY=1")
    });
    assert!(got_everything, "{received:?} / {:#?}", read_log(&log_path));
    assert_eq!(received.iter().filter(|message| *message == "READY=1").count(), 1);
    assert_eq!(count_code(&log_path, "HA06"), 1, "the child saw no notify variables");

    watcher.signal(Signal::SIGTERM);
    assert_eq!(watcher.wait_exit(Duration::from_secs(10)), Some(0));
    let stopping = wait_until(Duration::from_secs(5), || {
        let length = systemd.recv(&mut buffer).expect("a notification");
        &buffer[..length] == b"STOPPING=1"
    });
    assert!(stopping, "STOPPING=1 sent on a requested stop");
}
