//! `weftctl` for real: the demo binary starts a control plane, sidecars and echo pods on
//! loopback; the query commands run against it and their JSON is checked; the demo then stops
//! by itself within its bounded duration and leaves nothing behind.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const WEFTCTL: &str = env!("CARGO_BIN_EXE_weftctl");

/// Kills the demo if the test fails before it stops by itself.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn weftctl(cp: &str, args: &[&str]) -> (i32, Value) {
    let out = Command::new(WEFTCTL)
        .args(args)
        .args(["--cp", cp, "-o", "json"])
        .output()
        .expect("weftctl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "{args:?}: not JSON ({e}): {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), v)
}

#[test]
fn demo_serves_both_zones_and_queries_see_it() {
    let started = Instant::now();
    let child = Command::new(WEFTCTL)
        .args([
            "demo",
            "--duration",
            "12",
            "--refresh",
            "1",
            "--xds-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("demo starts");
    let mut guard = Guard(child);
    let stdout = guard.0.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut cp = String::new();
    let mut world = String::new();
    for line in lines.by_ref() {
        let line = line.expect("line");
        if let Some(rest) = line.trim().strip_prefix("control plane") {
            cp = rest.split_whitespace().nth(1).expect("cp addr").to_string();
        }
        if let Some(rest) = line.trim().strip_prefix("world") {
            world = rest.trim().to_string();
        }
        if line.starts_with("Try next") {
            break;
        }
    }
    assert!(!cp.is_empty(), "the demo printed its control plane address");
    assert!(
        std::path::Path::new(&world).exists(),
        "world file {world} exists while running"
    );

    // status: both client sidecars, every type SYNCED.
    let (code, status) = weftctl(&cp, &["status"]);
    assert_eq!(code, 0);
    let proxies = status.as_array().expect("array");
    let mut names: Vec<&str> = proxies.iter().filter_map(|p| p["proxy"].as_str()).collect();
    names.sort();
    assert_eq!(names, vec!["client-a", "client-b"]);
    for p in proxies {
        assert_eq!(p["replica"], "demo");
        for t in p["types"].as_array().expect("types") {
            assert_eq!(t["state"], "SYNCED", "{p}");
        }
    }
    let zone_b = proxies
        .iter()
        .find(|p| p["proxy"] == "client-b")
        .expect("client-b");
    assert_eq!(zone_b["zone"], "zone-b");

    // services: the split and its backends.
    let (_, services) = weftctl(&cp, &["services"]);
    let echo = services
        .as_array()
        .expect("array")
        .iter()
        .find(|s| s["name"] == "echo")
        .expect("echo");
    assert_eq!(
        echo["backends"],
        serde_json::json!(["echo-v1=90", "echo-v2=10"])
    );
    let v1 = services
        .as_array()
        .expect("array")
        .iter()
        .find(|s| s["name"] == "echo-v1")
        .expect("v1");
    assert_eq!(v1["ready_endpoints"], 2);

    // proxy-config: client-b sees echo-v1 in its own zone at priority 0, zone-a at 1.
    let (_, eps) = weftctl(&cp, &["proxy-config", "client-b", "endpoints"]);
    let v1 = eps
        .as_array()
        .expect("array")
        .iter()
        .find(|r| r["name"] == "echo-v1.default.svc.cluster.local:80")
        .expect("v1 endpoints");
    for e in v1["config"]["endpoints"].as_array().expect("endpoints") {
        let want = if e["zone"] == "zone-b" { 0 } else { 1 };
        assert_eq!(e["priority"], want, "{e}");
    }
    // errors: a clean world.
    let (code, errors) = weftctl(&cp, &["errors"]);
    assert_eq!((code, errors), (0, serde_json::json!([])));

    // The live view shows traffic served in both zones, all successful.
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = guard.0.wait().expect("demo exits");
    assert!(status.success(), "demo exit: {status}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the demo stops within its bounded duration"
    );
    let view = rest.join("\n");
    assert!(view.contains("client-a  echo-v1-a zone-a"), "{view}");
    assert!(view.contains("client-b  echo-v1-b zone-b"), "{view}");
    assert!(!view.contains("HTTP "), "no failed request: {view}");
    assert!(view.contains("is removed"), "{view}");
    assert!(
        !std::path::Path::new(&world).exists(),
        "the demo's temp world is removed"
    );
}

#[test]
fn unreachable_control_plane_is_a_clear_error() {
    let out = Command::new(WEFTCTL)
        .args(["status", "--cp", "127.0.0.1:1"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the control plane at 127.0.0.1:1"),
        "{err}"
    );
}
