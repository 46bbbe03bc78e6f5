//! Every binary's logs, as a log pipeline or `kubectl logs` reads them: stderr is a pipe (not a
//! terminal), so no ANSI escape may appear; with `--log-format json` every line is one JSON
//! object. Each binary is made to log for real: the control plane its start, the sidecar its
//! failing xDS stream, the injector and weftctl the warning for an invalid log filter.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use weft_e2e::lab::bin;

/// Runs `cmd` with stderr piped until `until` appears in stderr (or it exits, or 20 s pass),
/// then kills it and returns everything it wrote to stderr.
fn stderr_of(mut cmd: Command, until: &str) -> String {
    let mut child: Child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        let mut r = BufReader::new(stderr);
        let mut line = String::new();
        while r.read_line(&mut line).is_ok_and(|n| n > 0) {
            all.push_str(&line);
            let _ = tx.send(line.clone());
            line.clear();
        }
        let mut rest = String::new();
        let _ = r.read_to_string(&mut rest);
        all + &rest
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(l) if l.contains(until) => break,
            Ok(_) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    reader.join().unwrap_or_default()
}

/// The four binaries, each set up to log at least one line containing the returned marker.
fn commands(format: &str, dir: &std::path::Path) -> Vec<(&'static str, Command, &'static str)> {
    let mut out = Vec::new();
    let mut cp = Command::new(bin("weft-control-plane"));
    cp.args(["--source-dir", &dir.display().to_string()])
        .args([
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args(["--log-format", format]);
    out.push(("weft-control-plane", cp, "control plane serving"));
    let mut sc = Command::new(bin("weft-sidecar"));
    sc.args(["run", "--plaintext-xds", "--xds-addr", "127.0.0.1:9"])
        .args([
            "--outbound-addr",
            "127.0.0.1:0",
            "--inbound-addr",
            "127.0.0.1:0",
        ])
        .args(["--admin-addr", "127.0.0.1:0", "--log-format", format]);
    out.push(("weft-sidecar", sc, "xDS stream failed"));
    let mut inj = Command::new(bin("weft-injector"));
    inj.args(["--addr", "127.0.0.1:0", "--log", "not=a=filter"])
        .args([
            "--root-cert",
            "/nonexistent/root.pem",
            "--log-format",
            format,
        ]);
    out.push(("weft-injector", inj, "invalid log filter"));
    let mut ctl = Command::new(bin("weftctl"));
    ctl.env("WEFT_LOG", "not=a=filter")
        .args(["--log-format", format, "completions", "bash"]);
    out.push(("weftctl", ctl, "invalid log filter"));
    for (_, c, _) in &mut out {
        c.env_remove("NO_COLOR");
    }
    out
}

#[test]
fn no_colour_codes_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, cmd, marker) in commands("text", dir.path()) {
        let err = stderr_of(cmd, marker);
        assert!(
            err.contains(marker),
            "{name} did not log {marker:?}; its stderr:\n{err}"
        );
        assert!(
            !err.contains('\u{1b}'),
            "{name} wrote ANSI escapes to a pipe:\n{err:?}"
        );
    }
}

#[test]
fn json_log_format_writes_one_object_per_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, cmd, marker) in commands("json", dir.path()) {
        let err = stderr_of(cmd, marker);
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(!lines.is_empty(), "{name} logged nothing");
        let mut saw_marker = false;
        for l in &lines {
            let v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{name}: a log line is not JSON ({e}): {l}"));
            assert!(
                v["level"].is_string() && v["timestamp"].is_string(),
                "{name}: a JSON line without level/timestamp: {l}"
            );
            saw_marker |= v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(marker));
        }
        assert!(
            saw_marker,
            "{name}: no JSON line's message holds {marker:?}:\n{err}"
        );
    }
}
