//! Third-party xDS interop: a stock gRPC client (Python `grpcio`, with its own
//! xDS implementation and no Weft code) is pointed at our control plane with an
//! `xds:///echo.default.svc.cluster.local:50051` target.
//!
//! What it proves:
//! - grpc's xDS client accepts (ACKs) our ADS resources end to end: the API
//!   Listener (LDS), its RouteConfiguration (RDS), the Clusters (CDS, EDS with an
//!   ADS config source, ROUND_ROBIN) and the ClusterLoadAssignments (EDS). A
//!   NACK of any of them makes every call fail, and the test reports the error.
//! - grpc honours the `weighted_clusters` that an SMI TrafficSplit becomes: with
//!   a 90/10 split, 1000 calls land on v1/v2 within 5 binomial standard
//!   deviations of 900/100.
//! - A change of the watched source file is picked up: after the split is
//!   rewritten to 50/50, new clients see it within 10 s, and 1000 calls land
//!   within 5 standard deviations of 500/500.
//!
//! All traffic stays on loopback: the echo servers listen on 127.0.0.11 and
//! 127.0.0.12, the control plane on 127.0.0.1.
//!
//! Needs: the built `weft-control-plane` binary (`WEFT_CONTROL_PLANE_BIN`, else
//! `target/debug/weft-control-plane`; missing = test failure) and a Python with
//! `grpcio` (`WEFT_PYTHON`, else `.venv/bin/python` at the workspace root; see
//! `e2e/interop/README.md`). Without that Python the test prints `SKIP ...` and
//! passes.

use std::error::Error;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

type TestResult = Result<(), Box<dyn Error>>;

const INTEROP_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/interop");
const DEFAULT_PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python");
const DEFAULT_CONTROL_PLANE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../target/debug/weft-control-plane"
);
const TARGET: &str = "xds:///echo.default.svc.cluster.local:50051";
/// How long a child process gets to print its first (readiness) line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Owns every child process the test starts: dropping it (also while
/// unwinding from a failed assertion) kills and reaps them all.
#[derive(Default)]
struct Children {
    procs: Vec<(String, Child)>,
}

impl Children {
    fn push(&mut self, name: &str, child: Child) {
        self.procs.push((name.to_string(), child));
    }

    /// Fails if a child already exited: its stderr file tells why.
    fn check_alive(&mut self) -> Result<(), String> {
        for (name, child) in &mut self.procs {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("{name} exited early with {status}"));
            }
        }
        Ok(())
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &mut self.procs {
            let _ = child.kill();
        }
        for (_, child) in &mut self.procs {
            let _ = child.wait();
        }
    }
}

/// Reads a child's stdout line by line on a thread, forwarding each line.
/// The thread keeps draining after the receiver is gone, so a chatty child
/// never blocks on a full pipe; it ends at EOF, when the child dies.
fn line_reader<R: Read + Send + 'static>(out: R) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            match line {
                Ok(line) => {
                    let _ = tx.send(line);
                }
                Err(_) => break,
            }
        }
    });
    rx
}

/// Waits for the first line that satisfies `pick`, skipping the others.
fn wait_for_line<T>(
    what: &str,
    lines: &Receiver<String>,
    stderr_file: &Path,
    mut pick: impl FnMut(&str) -> Option<T>,
) -> Result<T, String> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                if let Some(found) = pick(line.trim()) {
                    return Ok(found);
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                return Err(format!(
                    "{what}: no readiness line within {STARTUP_TIMEOUT:?}; stderr:\n{}",
                    read_lossy(stderr_file)
                ));
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(format!(
                    "{what}: stdout closed before its readiness line; stderr:\n{}",
                    read_lossy(stderr_file)
                ));
            }
        }
    }
}

fn read_lossy(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// The Python to use, or why the test is skipped.
fn find_python() -> Result<PathBuf, String> {
    let python = match std::env::var_os("WEFT_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(DEFAULT_PYTHON),
    };
    if !python.exists() {
        return Err(format!(
            "no Python at {} (set WEFT_PYTHON or create the venv, see e2e/interop/README.md)",
            python.display()
        ));
    }
    let out = Command::new(&python)
        .args(["-c", "import grpc"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!(
            "`{} -c \"import grpc\"` failed: {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(python)
}

/// Starts one echo server on `ip:0` answering `name`; returns its port.
fn start_echo(
    children: &mut Children,
    python: &Path,
    dir: &Path,
    ip: &str,
    name: &str,
) -> Result<u16, Box<dyn Error>> {
    let stderr_path = dir.join(format!("echo-{name}.stderr"));
    let mut child = Command::new(python)
        .arg(Path::new(INTEROP_DIR).join("echo_server.py"))
        .arg("--addr")
        .arg(format!("{ip}:0"))
        .arg("--name")
        .arg(name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(File::create(&stderr_path)?))
        .spawn()?;
    let stdout = child.stdout.take().ok_or("echo server stdout not piped")?;
    children.push(&format!("echo server {name}"), child);
    let lines = line_reader(stdout);
    let port = wait_for_line(
        &format!("echo server {name}"),
        &lines,
        &stderr_path,
        |line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            let port = v.get("port")?.as_u64()?;
            u16::try_from(port).ok().filter(|p| *p != 0)
        },
    )?;
    Ok(port)
}

/// The Kubernetes world: service `echo` split between `echo-v1` and `echo-v2`.
fn world_yaml(v1_port: u16, v2_port: u16, v1_weight: u32, v2_weight: u32) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec: {{ports: [{{name: grpc, port: 50051, appProtocol: grpc}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo-v1, namespace: default}}
spec: {{ports: [{{name: grpc, port: 50051, appProtocol: grpc}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo-v2, namespace: default}}
spec: {{ports: [{{name: grpc, port: 50051, appProtocol: grpc}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: echo-v1-1, namespace: default, labels: {{kubernetes.io/service-name: echo-v1}}}}
addressType: IPv4
ports: [{{name: grpc, port: {v1_port}}}]
endpoints: [{{addresses: ["127.0.0.11"]}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: echo-v2-1, namespace: default, labels: {{kubernetes.io/service-name: echo-v2}}}}
addressType: IPv4
ports: [{{name: grpc, port: {v2_port}}}]
endpoints: [{{addresses: ["127.0.0.12"]}}]
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {{name: echo-split, namespace: default}}
spec: {{service: echo, backends: [{{service: echo-v1, weight: {v1_weight}}}, {{service: echo-v2, weight: {v2_weight}}}]}}
"#
    )
}

/// Writes the world atomically: a `.tmp` file (not a source extension) is
/// renamed over `world.yaml`, so the watcher never reads half a file.
fn write_world(source_dir: &Path, yaml: &str) -> std::io::Result<()> {
    let tmp = source_dir.join("world.yaml.tmp");
    fs::write(&tmp, yaml)?;
    fs::rename(&tmp, source_dir.join("world.yaml"))
}

/// One run of `xds_client.py`.
#[derive(Debug)]
struct Tally {
    v1: u64,
    v2: u64,
    /// Answers from anything but v1 and v2 (should never happen).
    other: u64,
    failures: u64,
    errors: Vec<String>,
}

fn run_client(
    python: &Path,
    bootstrap: &Path,
    calls: u32,
    timeout: Duration,
) -> Result<Tally, Box<dyn Error>> {
    let out = Command::new(python)
        .arg(Path::new(INTEROP_DIR).join("xds_client.py"))
        .arg("--target")
        .arg(TARGET)
        .arg("--calls")
        .arg(calls.to_string())
        .arg("--timeout-s")
        .arg(format!("{:.1}", timeout.as_secs_f64()))
        .env("GRPC_XDS_BOOTSTRAP", bootstrap)
        .stdin(Stdio::null())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!(
            "xds_client.py exited with {}; stderr:\n{stderr}",
            out.status
        )
        .into());
    }
    let line = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| {
            format!("xds_client.py printed no JSON; stdout:\n{stdout}\nstderr:\n{stderr}")
        })?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    let counts = v
        .get("counts")
        .and_then(|c| c.as_object())
        .ok_or_else(|| format!("no \"counts\" object in {line}"))?;
    let mut tally = Tally {
        v1: 0,
        v2: 0,
        other: 0,
        failures: v
            .get("failures")
            .and_then(|f| f.as_u64())
            .ok_or_else(|| format!("no \"failures\" number in {line}"))?,
        errors: v
            .get("errors")
            .and_then(|e| e.as_array())
            .map(|errs| {
                errs.iter()
                    .map(|e| e.as_str().unwrap_or("?").to_string())
                    .collect()
            })
            .unwrap_or_default(),
    };
    for (name, n) in counts {
        let n = n
            .as_u64()
            .ok_or_else(|| format!("count of {name} is not a number in {line}"))?;
        match name.as_str() {
            "v1" => tally.v1 += n,
            "v2" => tally.v2 += n,
            _ => tally.other += n,
        }
    }
    Ok(tally)
}

/// Asserts a clean run of `calls` calls whose v2 share is within 5 binomial
/// standard deviations of `p_v2`.
fn assert_split(what: &str, tally: &Tally, calls: u32, p_v2: f64) {
    assert_eq!(
        tally.failures, 0,
        "{what}: failed calls (first errors: {:?}): {tally:?}",
        tally.errors
    );
    assert_eq!(
        tally.other, 0,
        "{what}: answers from unknown servers: {tally:?}"
    );
    assert_eq!(
        tally.v1 + tally.v2,
        u64::from(calls),
        "{what}: v1 + v2 must be all {calls} calls: {tally:?}"
    );
    let n = f64::from(calls);
    let expected = n * p_v2;
    let tolerance = 5.0 * (n * p_v2 * (1.0 - p_v2)).sqrt();
    let got = tally.v2 as f64;
    assert!(
        (got - expected).abs() <= tolerance,
        "{what}: v2 got {got} of {calls} calls, expected {expected} ± {tolerance:.1}: {tally:?}"
    );
    println!(
        "{what}: v1={} v2={} (expected v2 {expected} ± {tolerance:.1})",
        tally.v1, tally.v2
    );
}

#[test]
fn grpc_xds_interop() -> TestResult {
    let python = match find_python() {
        Ok(p) => p,
        Err(reason) => {
            println!("SKIP grpc_xds_interop: {reason}");
            return Ok(());
        }
    };
    let control_plane = match std::env::var_os("WEFT_CONTROL_PLANE_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(DEFAULT_CONTROL_PLANE),
    };
    assert!(
        control_plane.is_file(),
        "control plane binary not found at {} (build it first: cargo build -p weft-control-plane, \
         or set WEFT_CONTROL_PLANE_BIN)",
        control_plane.display()
    );

    // Declared before `children`, so it is removed only after they are killed.
    let tmp = tempfile::tempdir()?;
    let source_dir = tmp.path().join("source");
    fs::create_dir(&source_dir)?;
    let mut children = Children::default();

    // 1. The two backends, on their own loopback addresses.
    let v1_port = start_echo(&mut children, &python, tmp.path(), "127.0.0.11", "v1")?;
    let v2_port = start_echo(&mut children, &python, tmp.path(), "127.0.0.12", "v2")?;

    // 2. The world, written once the backends' ports are known.
    write_world(&source_dir, &world_yaml(v1_port, v2_port, 90, 10))?;

    // 3. The control plane. Its stdout also carries its logs: skip to the
    //    `xds=` line, and keep draining it afterwards (line_reader does).
    let cp_stderr = tmp.path().join("control-plane.stderr");
    let mut cp = Command::new(&control_plane)
        .arg("--source-dir")
        .arg(&source_dir)
        .args([
            "--xds-plaintext-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(File::create(&cp_stderr)?))
        .spawn()?;
    let cp_stdout = cp.stdout.take().ok_or("control plane stdout not piped")?;
    children.push("control plane", cp);
    let cp_lines = line_reader(cp_stdout);
    let xds_addr = wait_for_line("control plane", &cp_lines, &cp_stderr, |line| {
        // `xds=127.0.0.1:PORT metrics=127.0.0.1:PORT`
        let rest = line.strip_prefix("xds=")?;
        rest.split_whitespace().next().map(str::to_string)
    })?;

    // 4. The bootstrap, outside the source dir (the source reads `.json` too).
    let bootstrap = tmp.path().join("bootstrap.json");
    let bootstrap_json = serde_json::json!({
        "xds_servers": [{
            "server_uri": xds_addr,
            "channel_creds": [{"type": "insecure"}],
            "server_features": ["xds_v3"],
        }],
        "node": {"id": "interop-client", "locality": {"zone": "z1"}},
    });
    fs::write(&bootstrap, serde_json::to_vec_pretty(&bootstrap_json)?)?;

    // 5. 90/10.
    let tally = run_client(&python, &bootstrap, 1000, Duration::from_secs(60))?;
    children.check_alive()?;
    assert_split("split 90/10", &tally, 1000, 0.1);

    // 6. Rewrite the split to 50/50; wait for new clients to see it.
    write_world(&source_dir, &world_yaml(v1_port, v2_port, 50, 50))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let batch = run_client(&python, &bootstrap, 100, left.max(Duration::from_secs(1)))?;
        if batch.v2 >= 30 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the 50/50 split was not picked up within 10 s; last batch of 100: {batch:?}"
        );
        thread::sleep(Duration::from_millis(200));
    }
    let tally = run_client(&python, &bootstrap, 1000, Duration::from_secs(60))?;
    children.check_alive()?;
    assert_split("split 50/50", &tally, 1000, 0.5);

    drop(children);
    Ok(())
}

/// The grpcio client of [`grpcio_gets_permission_denied_through_the_sidecars`]: two calls to
/// `/weft.test.Echo/Who` through its sidecar's outbound, the second with `x-deny: yes`;
/// prints their outcomes as JSON.
const AUTHZ_CLIENT: &str = r#"
import grpc, json, sys
ch = grpc.insecure_channel(sys.argv[1], options=[("grpc.default_authority", sys.argv[2])])
call = ch.unary_unary("/weft.test.Echo/Who", request_serializer=lambda b: b, response_deserializer=lambda b: b)
out = []
for meta in ([], [("x-deny", "yes")]):
    try:
        out.append({"code": "OK", "body": call(b"", metadata=meta, timeout=10).decode()})
    except grpc.RpcError as e:
        out.append({"code": e.code().name, "details": e.details()})
print(json.dumps(out))
"#;

/// A grpcio client calls a gRPC server through two sidecars (mTLS, HTTP/2 between them): an
/// ALLOW policy lets its identity call the service by its host (judged on `Host`, the
/// Service name: between sidecars `:authority` names the endpoint), a DENY rule on a request header refuses
/// the call that carries it, and grpcio sees `PERMISSION_DENIED` with Envoy's message.
#[tokio::test]
async fn grpcio_gets_permission_denied_through_the_sidecars() -> TestResult {
    let python = match find_python() {
        Ok(p) => p,
        Err(reason) => {
            println!("SKIP grpcio_gets_permission_denied_through_the_sidecars: {reason}");
            return Ok(());
        }
    };
    let dir = tempfile::tempdir()?;
    let mut children = Children::default();
    let echo_port = start_echo(&mut children, &python, dir.path(), "127.0.93.10", "echo-0")?;
    let docs = [
        "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: default}\nspec:\n  ports: [{name: grpc, port: 50051, appProtocol: grpc}]\n".to_string(),
        weft_testkit::world::pod("echo-0", "echo", true),
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo\n  namespace: default\n  labels: {kubernetes.io/service-name: echo}\naddressType: IPv4\nports: [{name: grpc, port: 15006}]\nendpoints:\n- addresses: [\"127.0.93.2\"]\n  conditions: {ready: true}\n  targetRef: {kind: Pod, name: echo-0, namespace: default}\n".to_string(),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: callers, namespace: default}\nspec:\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]\n    to: [{operation: {paths: [/weft.test.Echo/*], hosts: [\"echo.default.svc.cluster.local*\"]}}]\n".to_string(),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: flagged, namespace: default}\nspec:\n  action: DENY\n  rules:\n  - when: [{key: \"request.headers[x-deny]\", values: [\"yes\"]}]\n".to_string(),
    ];
    fs::write(
        dir.path().join("world.yaml"),
        weft_testkit::world::docs(&docs),
    )?;
    let cp = weft_testkit::start_control_plane(dir.path()).await?;
    let bundles = dir.path().join("bundles");
    fs::create_dir_all(&bundles)?;
    let mut scfg = weft_testkit::mesh_sidecar_config(
        &cp,
        &bundles,
        "127.0.93.2".parse()?,
        "echo-0.default",
        "echo",
    )
    .await
    .map_err(|e| e.to_string())?;
    scfg.inbound_addr = "127.0.93.2:15006".parse()?;
    scfg.app_addr = Some(std::net::SocketAddr::new("127.0.93.10".parse()?, echo_port));
    let ccfg =
        weft_testkit::mesh_sidecar_config(&cp, &bundles, "127.0.93.1".parse()?, "client", "client")
            .await
            .map_err(|e| e.to_string())?;
    let server = weft_testkit::Sidecar::start(scfg).await?;
    let client = weft_testkit::Sidecar::start(ccfg).await?;
    weft_testkit::wait_ready(&server, Duration::from_secs(15)).await;
    weft_testkit::wait_ready(&client, Duration::from_secs(15)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let outcomes = loop {
        let out = tokio::process::Command::new(&python)
            .args(["-c", AUTHZ_CLIENT])
            .arg(client.outbound_addr.to_string())
            .arg("echo.default.svc.cluster.local:50051")
            .stdin(Stdio::null())
            .output()
            .await?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            format!(
                "client output is not JSON ({e}): {text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        if v[0]["code"] == "OK" || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(outcomes[0]["code"], "OK", "{outcomes}");
    assert_eq!(outcomes[0]["body"], "echo-0", "{outcomes}");
    assert_eq!(outcomes[1]["code"], "PERMISSION_DENIED", "{outcomes}");
    assert_eq!(outcomes[1]["details"], "RBAC: access denied", "{outcomes}");
    Ok(())
}
