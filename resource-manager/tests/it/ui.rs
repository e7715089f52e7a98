//! The web UI in a real browser: Debian's headless Chromium driven through
//! chromedriver's WebDriver protocol (plain JSON over HTTP), against a
//! standalone member running real jobs. Each page loads with no console
//! error; a job submitted through REST appears and is followed to its end
//! on its page, with its task's output; a memory hog's page shows its kill
//! reason; a job is killed from its page. Screenshots are kept in
//! `target/tmp/ui-screenshots/`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use weft_common::http::call::Http;

use crate::standalone::Standalone;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// chromedriver and every Chromium it started (its process group),
/// killed when dropped, whatever happens after it is spawned.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

struct Browser {
    _driver: Driver,
    wd: Http,
    session: String,
    _profile: tempfile::TempDir,
    shots: PathBuf,
}

impl Browser {
    /// A headless Chromium session, or None (said why) where Chromium or
    /// chromedriver is not installed (`.ci/run` installs both).
    async fn start() -> Option<Browser> {
        if !Path::new(CHROMIUM).exists() || !Path::new(CHROMEDRIVER).exists() {
            eprintln!(
                "skipped: the browser test needs {CHROMIUM} and {CHROMEDRIVER} (Debian's chromium and chromium-driver; .ci/run installs them)"
            );
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let profile = tempfile::tempdir().unwrap();
        use std::os::unix::process::CommandExt;
        let driver = Driver(
            Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .arg("--allowed-ips=127.0.0.1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                // Its own process group: dropped, the driver and every Chromium
                // process it started go together.
                .process_group(0)
                .spawn()
                .expect("starting chromedriver"),
        );
        let addr = format!("127.0.0.1:{port}");
        crate::rest::port_answers(&addr).await;
        let wd = Http::plain(addr);
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1400,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let r = wd
            .send(
                "POST",
                "/session",
                &[("content-type", "application/json")],
                caps.to_string(),
            )
            .await;
        let v = r.json();
        let session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
            .to_string();
        let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        Some(Browser {
            _driver: driver,
            wd,
            session,
            _profile: profile,
            shots,
        })
    }

    async fn cmd(&self, method: &str, path: &str, body: Value) -> Value {
        let r = self
            .wd
            .send(
                method,
                &format!("/session/{}{path}", self.session),
                &[("content-type", "application/json")],
                if body.is_null() {
                    String::new()
                } else {
                    body.to_string()
                },
            )
            .await;
        let v = r.json();
        assert!(
            v["value"].get("error").is_none(),
            "WebDriver {method} {path}: {v}"
        );
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.cmd("POST", "/url", json!({ "url": url })).await;
    }

    async fn js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            json!({ "script": script, "args": [] }),
        )
        .await
    }

    /// Runs `script` until it returns something other than null or false.
    async fn wait_for(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self.js(script).await;
            if !(v.is_null() || v == json!(false)) {
                return v;
            }
            if Instant::now() > deadline {
                let text = self.js("return document.body.innerText").await;
                let log = self
                    .cmd("POST", "/se/log", json!({ "type": "browser" }))
                    .await;
                panic!(
                    "{what}: never true on the page; it shows:\n{}\nconsole: {log}",
                    text.as_str().unwrap_or("")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the UI rendered `page` once.
    async fn ready(&self, page: &str) {
        self.wait_for(
            &format!("page {page} rendered"),
            &format!(
                "const m = document.getElementById('main'); return m.dataset.ready === '1' && m.dataset.page === '{page}'"
            ),
        )
        .await;
    }

    async fn screenshot(&self, name: &str) -> PathBuf {
        let v = self.cmd("GET", "/screenshot", Value::Null).await;
        use base64::Engine;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    /// The browser console's errors since the last call (and warnings
    /// about the page's own code).
    async fn console_errors(&self) -> Vec<String> {
        let v = self
            .cmd("POST", "/se/log", json!({ "type": "browser" }))
            .await;
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or("").to_string())
            .collect()
    }
}

async fn submit(api: &Http, spec: &str) -> String {
    let r = api
        .post("/v1/apps", "application/yaml", spec.to_string())
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["application_id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_loads_clean_in_a_real_browser_and_follows_jobs_to_their_end() {
    if crate::secure::skip(
        "a standalone cluster on loopback is plaintext and zero-config by design",
    ) {
        return;
    }
    let Some(b) = Browser::start().await else {
        return;
    };
    // One fake GPU (what NVML would show), shared by a task below.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let solo = Standalone::start_full(
        "[gpu]\nprobe = \"fake\"\n[[gpu.fake.devices]]\nuuid = \"GPU-ui-0\"\nmodel = \"Fake A100\"\nmemory = \"40GiB\"\n",
        true,
        Some(format!("127.0.0.1:{port}")),
    );
    let http = solo.http.clone().unwrap();
    crate::rest::port_answers(&http).await;
    let api = Http::plain(&http);
    let ok = submit(
        &api,
        "name: greet\nstages:\n  - name: run\n    instances: 2\n    command: 'echo hi-from-task-$WEFT_TASK_INDEX; sleep 3'\n    resources: { vcores: 0.2, memory: 32MiB }\n",
    )
    .await;
    let hog = submit(
        &api,
        "name: hog\nstages:\n  - name: load\n    command: 'exec tail /dev/zero'\n    resources: { vcores: 0.2, memory: 32MiB }\n",
    )
    .await;
    let base = format!("http://{http}/ui/");

    // Each page, as a user opens it.
    b.goto(&base).await;
    b.ready("cluster").await;
    b.wait_for(
        "the leader among the members",
        "const t = document.getElementById('members'); return t && t.innerText.includes('leader')",
    )
    .await;
    b.screenshot("cluster").await;
    // Half of the GPU shared to a task: the nodes page shows the device's
    // share and the memory it promises.
    let shared = submit(
        &api,
        "name: share\nstages:\n  - name: infer\n    command: 'sleep 600'\n    resources: { vcores: 0.2, memory: 32MiB, gpus: 0.5, gpu_memory: 10GiB }\n",
    )
    .await;
    b.goto(&format!("{base}#/nodes")).await;
    b.ready("nodes").await;
    b.wait_for(
        "node solo's GPU half shared",
        "const g = document.querySelector('[data-node=\"solo\"] [data-gpu=\"0\"]'); return g && g.textContent.includes('50% shared, 10.0 GiB promised')",
    )
    .await;
    b.screenshot("nodes").await;
    let r = api.post(&format!("/v1/apps/{shared}/kill"), "", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    b.goto(&format!("{base}#/queues")).await;
    b.ready("queues").await;
    b.wait_for(
        "queue root",
        "return document.querySelector('[data-queue=\"root\"]') !== null",
    )
    .await;
    b.screenshot("queues").await;
    b.goto(&format!("{base}#/apps")).await;
    b.ready("apps").await;
    b.wait_for(
        "the job submitted through REST",
        &format!("return document.querySelector('[data-app=\"{ok}\"]') !== null"),
    )
    .await;
    b.screenshot("apps").await;
    let errors = b.console_errors().await;
    assert!(errors.is_empty(), "console errors: {errors:?}");

    // Its page, from the list, followed to its end.
    b.js(&format!(
        "document.querySelector('[data-app=\"{ok}\"] a').click(); return true"
    ))
    .await;
    b.ready("apps").await;
    b.wait_for(
        "the job's page",
        "return document.getElementById('app-state') !== null",
    )
    .await;
    b.wait_for(
        "the job succeeded on its page",
        "const s = document.getElementById('app-state'); return s && s.textContent === 'succeeded'",
    )
    .await;
    let stage = b
        .js("return document.querySelector('[data-stage=\"run\"]').innerText")
        .await;
    assert!(stage.as_str().unwrap().contains("2/2"), "{stage}");
    b.js("document.querySelector('[data-task=\"run/1\"] [data-logs]').click(); return true")
        .await;
    b.wait_for(
        "the task's output",
        "return document.getElementById('logs').textContent.includes('hi-from-task-1')",
    )
    .await;
    b.screenshot("app-succeeded").await;

    // The memory hog's page: its kill reason, with its figures.
    b.goto(&format!("{base}#/apps/{hog}")).await;
    b.ready("apps").await;
    b.wait_for(
        "the hog failed",
        "const s = document.getElementById('app-state'); return s && s.textContent === 'failed'",
    )
    .await;
    let tasks = b
        .wait_for(
            "its kill reason",
            "const t = document.getElementById('tasks'); return t && t.innerText.includes('over its memory quota') && t.innerText",
        )
        .await;
    assert!(tasks.as_str().unwrap().contains("load/0"), "{tasks}");
    let why = b
        .js("return document.getElementById('app-why').textContent")
        .await;
    assert!(
        why.as_str().unwrap().contains("over its memory quota"),
        "{why}"
    );
    b.screenshot("app-killed-over-memory").await;

    // Killed from its page (two clicks: Kill, then Confirm kill).
    let nap = submit(
        &api,
        "name: nap\nstages:\n  - name: run\n    command: 'sleep 600'\n    resources: { vcores: 0.2, memory: 32MiB }\n",
    )
    .await;
    b.goto(&format!("{base}#/apps/{nap}")).await;
    b.ready("apps").await;
    b.wait_for(
        "the kill button",
        "return document.getElementById('kill') !== null",
    )
    .await;
    b.js("document.getElementById('kill').click(); return true")
        .await;
    // A refresh in between keeps the first click (the button says so).
    b.wait_for(
        "the kill button asks to confirm",
        "return document.getElementById('kill').textContent === 'Confirm kill'",
    )
    .await;
    b.js("document.getElementById('kill').click(); return true")
        .await;
    b.wait_for(
        "the job killed from its page",
        "const s = document.getElementById('app-state'); return s && s.textContent === 'killed'",
    )
    .await;
    let r = api.get(&format!("/v1/apps/{nap}")).await;
    assert_eq!(r.json()["state"], "killed");
    b.screenshot("app-killed-from-ui").await;
    let errors = b.console_errors().await;
    assert!(errors.is_empty(), "console errors: {errors:?}");
    b.cmd("DELETE", "", Value::Null).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_users_on_a_token_entered_once_opens_every_page() {
    if crate::secure::skip("it sets up its own users (it runs in the plaintext pass)") {
        return;
    }
    let Some(b) = Browser::start().await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let admin = format!("weft_{}", "5e".repeat(32));
    let file = tmp.path().join("admin.token");
    std::fs::write(&file, &admin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Users on over plaintext loopback (`insecure`: a test's single host).
    let extra = format!(
        "insecure = true\n[acl]\nenabled = true\ninitial_admin_token_file = {:?}\n[http]\nlisten = \"{{http}}\"\n",
        file.display().to_string()
    );
    let cluster = crate::cluster::Cluster::start_with(1, 1000, &extra);
    let http = cluster.members[0].http.clone();
    crate::rest::port_answers(&http).await;
    let base = format!("http://{http}/ui/");

    // No token yet: the page says what to do, and shows nothing else.
    b.goto(&format!("{base}#/apps")).await;
    b.wait_for(
        "the banner asking for a token",
        "const e = document.getElementById('error'); return !e.hidden && e.textContent.includes('enter a token above')",
    )
    .await;
    let shown = b
        .js("return document.getElementById('main').dataset.ready || ''")
        .await;
    assert_eq!(shown, json!(""), "a page rendered without a token");
    b.screenshot("no-token").await;

    // Entered once: every page opens, after a reload too.
    b.js(&format!(
        "document.getElementById('token').value = '{admin}'; document.getElementById('token-form').requestSubmit(); return true"
    ))
    .await;
    b.ready("apps").await;
    b.wait_for(
        "who the page calls as",
        "return document.getElementById('who').textContent === 'admin (admin)'",
    )
    .await;
    for page in ["cluster", "queues", "nodes"] {
        b.goto(&format!("{base}#/{page}")).await;
        b.ready(page).await;
    }
    b.goto(&base).await; // a reload
    b.ready("cluster").await;
    let banner = b.js("return document.getElementById('error').hidden").await;
    assert_eq!(banner, json!(true));
    b.screenshot("with-token").await;
    // The refusals before the token (HTTP 401s) are the only errors.
    let errors: Vec<String> = b
        .console_errors()
        .await
        .into_iter()
        .filter(|e| !e.contains("401 (Unauthorized)") && !e.contains("503 (Service Unavailable)"))
        .collect();
    assert!(errors.is_empty(), "console errors: {errors:?}");
    b.cmd("DELETE", "", Value::Null).await;
}
