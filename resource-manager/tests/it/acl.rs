//! Users and their rights over real TLS: three members with `[acl]` on, a
//! real agent, tokens made by the real `rmctl acl`, users with client
//! certificates; who may see, read and kill what, and every way in refused.

use std::process::Output;
use std::time::Duration;

use weft_proto::v1 as pb;

use crate::cluster::Cluster;
use crate::nodes::AgentProcess;
use crate::tls::{ca_dir, cert, ok, settings};

/// How a user calls: a token, a client certificate, or neither.
#[derive(Clone, Copy)]
enum As<'a> {
    Token(&'a str),
    Cert(&'a str),
    Nobody,
}

struct Ctx {
    rm: String,
    dir: std::path::PathBuf,
}

impl Ctx {
    /// `rmctl` as `who`, with the cluster's CA, none of the caller's settings.
    fn rmctl(&self, who: As<'_>, args: &[&str]) -> Output {
        let path =
            std::path::Path::new(env!("CARGO_BIN_EXE_resource-manager")).with_file_name("rmctl");
        let mut cmd = std::process::Command::new(path);
        let ca = self.dir.join("weft-ca.pem");
        cmd.args(["--rm", &self.rm, "--timeout", "60", "--tls-ca"])
            .arg(&ca);
        for var in [
            "WEFT_RM",
            "WEFT_CONFIG",
            "WEFT_TLS_CA",
            "WEFT_TLS_CERT",
            "WEFT_TLS_KEY",
            "WEFT_TOKEN",
            "WEFT_TOKEN_FILE",
        ] {
            cmd.env_remove(var);
        }
        match who {
            // As a user's shell passes it.
            As::Token(t) => {
                cmd.env("WEFT_TOKEN", t);
            }
            As::Cert(name) => {
                cmd.arg("--tls-cert")
                    .arg(self.dir.join(format!("client-{name}.pem")))
                    .arg("--tls-key")
                    .arg(self.dir.join(format!("client-{name}-key.pem")));
            }
            As::Nobody => {}
        }
        cmd.args(args).output().unwrap()
    }

    /// The secret `rmctl acl token create` printed.
    fn token(&self, admin: &str, args: &[&str]) -> (String, String) {
        let mut all = vec!["-o", "json", "acl", "token", "create"];
        all.extend_from_slice(args);
        let v: serde_json::Value =
            serde_json::from_str(&ok(&self.rmctl(As::Token(admin), &all))).unwrap();
        (
            v["secret"].as_str().unwrap().to_string(),
            v["accessor"].as_str().unwrap().to_string(),
        )
    }
}

/// rmctl failed with a message holding every one of `needles`.
fn refused(o: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "should be refused: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    for n in needles {
        assert!(err.contains(n), "{n:?} not in {err:?}");
    }
}

/// Every ClientService call (but bootstrap), each with its answer's status.
async fn every_call(
    ch: tonic::transport::Channel,
    bearer: Option<&str>,
) -> Vec<(&'static str, tonic::Status)> {
    let value: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> =
        bearer.map(|b| format!("Bearer {b}").parse().unwrap());
    let mut c = pb::client_service_client::ClientServiceClient::with_interceptor(
        ch,
        move |mut r: tonic::Request<()>| {
            if let Some(v) = &value {
                r.metadata_mut().insert("authorization", v.clone());
            }
            Ok(r)
        },
    );
    let mut out = Vec::new();
    macro_rules! call {
        ($name:literal, $e:expr) => {
            out.push((
                $name,
                $e.await.err().unwrap_or_else(|| tonic::Status::ok("")),
            ))
        };
    }
    call!(
        "SubmitApplication",
        c.submit_application(pb::SubmitApplicationRequest {
            spec: crate::cluster::job("x", "root"),
            ..Default::default()
        })
    );
    let app = pb::GetApplicationRequest {
        application_id: "app-000001".into(),
    };
    call!("GetApplication", c.get_application(app.clone()));
    call!(
        "ListApplications",
        c.list_applications(pb::ListApplicationsRequest::default())
    );
    call!(
        "KillApplication",
        c.kill_application(pb::KillApplicationRequest {
            application_id: "app-000001".into()
        })
    );
    call!("WatchApplication", c.watch_application(app));
    call!("ListNodes", c.list_nodes(pb::ListNodesRequest {}));
    call!(
        "DrainNode",
        c.drain_node(pb::DrainNodeRequest {
            node_id: "node-a".into()
        })
    );
    call!("ListQueues", c.list_queues(pb::ListQueuesRequest {}));
    call!(
        "ClusterStatus",
        c.cluster_status(pb::ClusterStatusRequest {})
    );
    call!(
        "GetTaskLogs",
        c.get_task_logs(pb::GetTaskLogsRequest {
            application_id: "app-000001".into(),
            ..Default::default()
        })
    );
    call!(
        "AddMember",
        c.add_member(pb::AddMemberRequest {
            id: 9,
            address: "127.0.0.1:1".into()
        })
    );
    call!(
        "RemoveMember",
        c.remove_member(pb::RemoveMemberRequest { id: 3 })
    );
    call!(
        "SetQueues",
        c.set_queues(pb::SetQueuesRequest {
            config_toml: String::new()
        })
    );
    call!(
        "CreateAclToken",
        c.create_acl_token(pb::CreateAclTokenRequest {
            user: "x".into(),
            admin: true,
            ..Default::default()
        })
    );
    call!(
        "ListAclTokens",
        c.list_acl_tokens(pb::ListAclTokensRequest {})
    );
    call!(
        "RevokeAclToken",
        c.revoke_acl_token(pb::RevokeAclTokenRequest {
            accessor: "0".into()
        })
    );
    call!("WhoAmI", c.who_am_i(pb::WhoAmIRequest {}));
    out
}

/// Every answer refuses: UNAUTHENTICATED, or (from a follower that does not
/// know the token and cannot catch up itself) a redirect to the leader,
/// which then refuses. Nothing is served.
fn all_refused(answers: &[(&str, tonic::Status)], why: &str, leader: bool) {
    assert_eq!(answers.len(), 17);
    for (call, s) in answers {
        let redirected =
            s.code() == tonic::Code::Unavailable && s.metadata().get("weft-leader").is_some();
        assert!(
            s.code() == tonic::Code::Unauthenticated || (!leader && redirected),
            "{call} with {why} (leader: {leader}): {s:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_see_and_kill_only_what_is_theirs_and_every_way_in_is_checked() {
    if crate::secure::skip(
        "it secures its own cluster with its own CA and users (it runs in the plaintext pass)",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = ca_dir(tmp.path());
    for i in 1..=3 {
        cert(&d, "rm", &format!("rm{i}"));
    }
    cert(&d, "agent", "node-a");
    // carol administers queue root.team; ops is a cluster admin by config.
    cert(&d, "client", "carol");
    cert(&d, "client", "ops");
    let ca_s = d.join("weft-ca.pem").display().to_string();
    let extra = format!(
        "audit_log = \"{0}/audit-{{id}}.jsonl\"\n\
         [tls]\nca_file = {ca_s:?}\ncert_file = \"{0}/rm-rm{{id}}.pem\"\nkey_file = \"{0}/rm-rm{{id}}-key.pem\"\n\
         [acl]\nenabled = true\nadmins = [\"ops\"]\n\
         [masters]\nlaunch = true\ncommand = {1:?}\n\
         [[queues]]\nname = \"root.team\"\nadmin_acl = [\"carol\"]\n\
         [[queues]]\nname = \"root.private\"\nsubmit_acl = [\"alice\"]\n\
         [[queues]]\nname = \"root.default\"\n",
        d.display(),
        crate::apps::app_master().display().to_string()
    );
    let cluster = Cluster::start_with(3, 1000, &extra);
    let cx = Ctx {
        rm: cluster.addrs().join(","),
        dir: d.clone(),
    };
    let _agent = AgentProcess::start_with(
        "node-a",
        &cluster.addrs(),
        "127.0.0.1",
        "",
        &format!(
            "[tls]\nca_file = {ca_s:?}\ncert_file = \"{0}/agent-node-a.pem\"\nkey_file = \"{0}/agent-node-a-key.pem\"\n",
            d.display()
        ),
    );

    // The operator bootstraps at once (rmctl waits for a leader): one
    // admin token, once.
    let v: serde_json::Value = serde_json::from_str(&ok(
        &cx.rmctl(As::Nobody, &["-o", "json", "acl", "bootstrap"])
    ))
    .unwrap();
    let admin = v["secret"].as_str().unwrap().to_string();
    assert!(admin.starts_with("weft_") && v["admin"] == true, "{v}");
    refused(
        &cx.rmctl(As::Nobody, &["acl", "bootstrap"]),
        &["bootstrapped already"],
    );
    // But a retry of the bootstrap itself (its answer lost) gets its token.
    let retried = cx.rmctl(As::Nobody, &["acl", "whoami"]);
    refused(&retried, &["no credentials"]);
    let ca_only = crate::tls::ca_only(&d);
    let mut again = None;
    for m in &cluster.members {
        let ch = crate::tls::channel(&m.addr, &ca_only).await;
        let r = pb::client_service_client::ClientServiceClient::new(ch)
            .acl_bootstrap(pb::AclBootstrapRequest {
                secret: admin.clone(),
            })
            .await;
        if let Ok(r) = r {
            again = Some(r.into_inner());
        }
    }
    let again = again.expect("the leader takes the retry");
    assert_eq!(
        again.token.unwrap().accessor,
        v["accessor"].as_str().unwrap()
    );
    let (alice, alice_acc) = cx.token(&admin, &["--user", "alice"]);
    let (bob, _) = cx.token(&admin, &["--user", "bob", "--ttl", "30d"]);
    let (short, _) = cx.token(&admin, &["--user", "bob", "--ttl", "1s"]);
    let (revoked, revoked_acc) = cx.token(&admin, &["--user", "eve"]);
    ok(&cx.rmctl(As::Token(&admin), &["acl", "token", "revoke", &revoked_acc]));
    let who = ok(&cx.rmctl(As::Token(&alice), &["acl", "whoami"]));
    assert_eq!(who.trim(), format!("alice by token {alice_acc}"));
    // From a token file, as rmctl.toml's token_file or WEFT_TOKEN_FILE
    // names it: only one its owner alone may read.
    let file = tmp.path().join("alice.token");
    std::fs::write(&file, format!("{alice}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let who = ok(&cx.rmctl(
        As::Nobody,
        &["--token-file", file.to_str().unwrap(), "acl", "whoami"],
    ));
    assert_eq!(who.trim(), format!("alice by token {alice_acc}"));
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    refused(
        &cx.rmctl(
            As::Nobody,
            &["--token-file", file.to_str().unwrap(), "acl", "whoami"],
        ),
        &["may be read by others (mode 644)"],
    );
    let who = ok(&cx.rmctl(As::Cert("carol"), &["acl", "whoami"]));
    assert_eq!(who.trim(), "carol by certificate");
    let who = ok(&cx.rmctl(As::Cert("ops"), &["acl", "whoami"]));
    assert_eq!(who.trim(), "ops (admin) by certificate");

    // No token, a forged one, an expired one and a revoked one: every call
    // of ClientService refuses them, on every member.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let forged = format!("weft_{}", "5a".repeat(32));
    let status: serde_json::Value = serde_json::from_str(&ok(
        &cx.rmctl(As::Token(&admin), &["-o", "json", "cluster", "status"])
    ))
    .unwrap();
    let leader_id = status["leader_id"].as_u64().unwrap();
    for m in &cluster.members {
        let leader = m.id == leader_id;
        let ch = crate::tls::channel(&m.addr, &ca_only).await;
        all_refused(&every_call(ch.clone(), None).await, "no credentials", true);
        all_refused(
            &every_call(ch.clone(), Some(&forged)).await,
            "a forged token",
            leader,
        );
        all_refused(
            &every_call(ch.clone(), Some(&revoked)).await,
            "a revoked token",
            leader,
        );
        let expired = every_call(ch.clone(), Some(&short)).await;
        all_refused(&expired, "an expired token", true);
        assert!(
            expired[0].1.message().contains("of user bob expired"),
            "{:?}",
            expired[0].1
        );
        // A node's certificate names no user.
        let node = settings(&d, "agent", "node-a");
        let ch = crate::tls::channel(&m.addr, &node).await;
        all_refused(&every_call(ch, None).await, "a node's certificate", true);
    }
    refused(
        &cx.rmctl(As::Token(&revoked), &["app", "list"]),
        &["token not recognised"],
    );

    // alice's long job in root.team and bob's short one.
    let submit = |who: As<'_>, queue: &str, cmd: &str| {
        cx.rmctl(
            who,
            &[
                "submit", "--queue", queue, "--vcores", "0.5", "--memory", "64MiB", "--", "sh",
                "-c", cmd,
            ],
        )
    };
    let a1 = ok(&submit(
        As::Token(&alice),
        "root.team",
        "echo alice-secret; sleep 60",
    ))
    .trim()
    .to_string();
    let b1 = ok(&submit(As::Token(&bob), "root.default", "echo bob-here"))
        .trim()
        .to_string();
    let report = ok(&cx.rmctl(As::Token(&bob), &["-o", "json", "app", "wait", &b1]));
    assert!(report.contains("SUCCEEDED"), "{report}");
    let st = ok(&cx.rmctl(As::Token(&alice), &["-o", "json", "app", "status", &a1]));
    assert!(st.contains("\"user\":\"alice\""), "{st}");

    // bob cannot see, follow, read the logs of or kill alice's job, and
    // does not find it in his list.
    for (args, what) in [
        (vec!["app", "status", a1.as_str()], "see"),
        (vec!["app", "wait", a1.as_str()], "see"),
        (
            vec!["app", "logs", a1.as_str(), "run/0"],
            "read the logs of",
        ),
        (vec!["app", "kill", a1.as_str()], "kill"),
    ] {
        refused(
            &cx.rmctl(As::Token(&bob), &args),
            &[
                "user bob (token ",
                &format!("may not {what} application {a1}: only its user"),
            ],
        );
    }
    let list = ok(&cx.rmctl(As::Token(&bob), &["app", "list"]));
    assert!(list.contains(&b1) && !list.contains(&a1), "{list}");
    // Nor submit as alice, nor to a queue only alice may use.
    refused(
        &cx.rmctl(
            As::Token(&bob),
            &[
                "submit",
                "--queue",
                "root.default",
                "--user",
                "alice",
                "--",
                "true",
            ],
        ),
        &["user bob (token ", "may not submit as user alice"],
    );
    refused(
        &submit(As::Token(&bob), "root.private", "true"),
        &["queue: user bob (token ", "may not submit to root.private"],
    );
    // Queues, members, drains and tokens are for admins.
    let queues = tmp.path().join("queues.toml");
    std::fs::write(&queues, "[[queues]]\nname = \"root.x\"\n").unwrap();
    for args in [
        vec!["queue", "set", "-f", queues.to_str().unwrap()],
        vec!["cluster", "add-member", "9", "127.0.0.1:1"],
        vec!["cluster", "remove-member", "3"],
        vec!["node", "drain", "node-a"],
        vec!["acl", "token", "create", "--user", "mallory", "--admin"],
        vec!["acl", "token", "list"],
        vec!["acl", "token", "revoke", &alice_acc],
    ] {
        refused(
            &cx.rmctl(As::Token(&bob), &args),
            &["user bob (token ", "only admins may"],
        );
    }
    // Reading the cluster is for every user.
    assert!(ok(&cx.rmctl(As::Token(&bob), &["node", "list"])).contains("node-a"));

    // A stream outlives its start only while its token does: alice follows
    // her job with a second token, which is revoked meanwhile.
    let (alice2, alice2_acc) = cx.token(&admin, &["--user", "alice"]);
    let ca = d.join("weft-ca.pem");
    let follower = std::process::Command::new(
        std::path::Path::new(env!("CARGO_BIN_EXE_resource-manager")).with_file_name("rmctl"),
    )
    .args(["--rm", &cx.rm, "--timeout", "10", "--tls-ca"])
    .arg(&ca)
    .args(["app", "wait", &a1])
    .env("WEFT_TOKEN", &alice2)
    .env_remove("WEFT_TOKEN_FILE")
    .env_remove("WEFT_CONFIG")
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    ok(&cx.rmctl(As::Token(&admin), &["acl", "token", "revoke", &alice2_acc]));
    let ended = tokio::task::spawn_blocking(move || follower.wait_with_output().unwrap());
    let ended = tokio::time::timeout(Duration::from_secs(15), ended)
        .await
        .expect("a revoked token's watch went on")
        .unwrap();
    refused(&ended, &["token"]);

    // carol, an admin of root.team by certificate, sees alice's job, reads
    // its logs and kills it; she does not see bob's.
    assert!(ok(&cx.rmctl(As::Cert("carol"), &["app", "status", &a1])).contains(&a1));
    // (The task prints at its start: read until it has.)
    let mut logs = String::new();
    for _ in 0..150 {
        let o = cx.rmctl(As::Cert("carol"), &["app", "logs", &a1, "run/0"]);
        logs = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        if logs.contains("alice-secret") || logs.contains("PermissionDenied") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(logs.contains("alice-secret"), "{logs}");
    let list = ok(&cx.rmctl(As::Cert("carol"), &["app", "list"]));
    assert!(list.contains(&a1) && !list.contains(&b1), "{list}");
    ok(&cx.rmctl(As::Cert("carol"), &["app", "kill", &a1]));
    let st = ok(&cx
        .rmctl(As::Token(&alice), &["app", "wait", &a1])
        .or_failed());
    assert!(st.contains("KILLED"), "{st}");

    // An admin sees everything and every token (never a secret).
    let list = ok(&cx.rmctl(As::Token(&admin), &["app", "list"]));
    assert!(list.contains(&a1) && list.contains(&b1), "{list}");
    let tokens = ok(&cx.rmctl(As::Cert("ops"), &["-o", "json", "acl", "token", "list"]));
    let tokens: serde_json::Value = serde_json::from_str(&tokens).unwrap();
    let tokens = tokens.as_array().unwrap();
    assert_eq!(
        tokens.len(),
        4,
        "bootstrap, alice, bob, bob's short one: {tokens:?}"
    );
    assert!(!tokens.iter().any(|t| t.to_string().contains("weft_")));
    assert!(!tokens.iter().any(|t| t["accessor"] == revoked_acc.as_str()));

    // The audit log: a line for every write, done or refused, on the member
    // that did (or refused) it.
    let mut lines = Vec::new();
    for i in 1..=3 {
        let text = std::fs::read_to_string(d.join(format!("audit-{i}.jsonl"))).unwrap_or_default();
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["member"], i, "{v}");
            lines.push(v);
        }
    }
    let find = |f: &dyn Fn(&serde_json::Value) -> bool, what: &str| {
        assert!(
            lines.iter().any(f),
            "no audit line for {what} in {}",
            serde_json::Value::Array(lines.clone())
        )
    };
    find(
        &|v| {
            v["action"] == "kill_application"
                && v["user"] == "bob"
                && v["method"] == "token"
                && v["target"] == a1.as_str()
                && v["outcome"] == "refused"
                && v["code"] == "PermissionDenied"
                && v["from"]
                    .as_str()
                    .is_some_and(|f| f.starts_with("127.0.0.1:"))
        },
        "bob's refused kill",
    );
    find(
        &|v| {
            v["action"] == "kill_application"
                && v["user"] == "carol"
                && v["method"] == "certificate"
                && v["outcome"] == "ok"
        },
        "carol's kill",
    );
    find(
        &|v| {
            v["action"] == "submit_application"
                && v["user"] == "alice"
                && v["target"] == a1.as_str()
                && v["outcome"] == "ok"
        },
        "alice's submission",
    );
    find(
        &|v| {
            v["action"] == "submit_application"
                && v["user"].is_null()
                && v["outcome"] == "refused"
                && v["code"] == "Unauthenticated"
        },
        "a submission without credentials",
    );
    find(
        &|v| v["action"] == "acl_bootstrap" && v["outcome"] == "failed",
        "the second bootstrap",
    );
    find(
        &|v| {
            v["action"] == "revoke_acl_token"
                && v["target"] == format!("token {revoked_acc}").as_str()
                && v["outcome"] == "ok"
        },
        "the revocation",
    );
    find(
        &|v| v["action"] == "set_queues" && v["user"] == "bob" && v["outcome"] == "refused",
        "bob's queue change",
    );
    // No line of a follower's redirect, and never a secret.
    let redirects: Vec<_> = lines
        .iter()
        .filter(|v| v["code"] == "Unavailable")
        .collect();
    assert!(redirects.is_empty(), "{redirects:?}");
    assert!(!lines.iter().any(|v| v.to_string().contains("weft_")));
}

/// Helpers for rmctl outputs whose exit status the test reads itself.
trait OutputExt {
    /// `rmctl app wait` of a job that did not succeed exits 1 and prints
    /// its end: seen as a success here, keeping the output.
    fn or_failed(self) -> Output;
}

impl OutputExt for Output {
    fn or_failed(mut self) -> Output {
        if !self.status.success() && !self.stdout.is_empty() {
            use std::os::unix::process::ExitStatusExt;
            self.status = std::process::ExitStatus::from_raw(0);
        }
        self
    }
}

/// A test OIDC issuer: a P-256 key, its JWKS entry, and tokens it signs.
struct Issuer {
    key: jsonwebtoken::EncodingKey,
    jwk: serde_json::Value,
    kid: String,
}

const ISSUER: &str = "https://login.example.test/realms/ml";

impl Issuer {
    fn new(kid: &str) -> Issuer {
        use base64::Engine;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = k.public_key_raw();
        Issuer {
            key: jsonwebtoken::EncodingKey::from_ec_der(&k.serialize_der()),
            jwk: serde_json::json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
                "x": b64(&raw[1..33]), "y": b64(&raw[33..])}),
            kid: kid.into(),
        }
    }

    /// A token for `user` (in `preferred_username`; `sub` is an opaque id)
    /// with `groups`, expiring `ttl_s` from now (negative: in the past).
    fn token(&self, user: &str, groups: &[&str], ttl_s: i64) -> String {
        let now = jsonwebtoken::get_current_timestamp() as i64;
        let claims = serde_json::json!({"iss": ISSUER, "aud": "weft", "sub": format!("id-{user}"),
            "preferred_username": user, "groups": groups, "iat": now, "exp": now + ttl_s});
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&h, &claims, &self.key).unwrap()
    }
}

fn write_jwks(path: &std::path::Path, issuers: &[&Issuer]) {
    let keys: Vec<_> = issuers.iter().map(|i| i.jwk.clone()).collect();
    std::fs::write(path, serde_json::json!({ "keys": keys }).to_string()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_of_an_oidc_issuer_call_with_its_tokens_and_its_key_rotates_without_a_restart() {
    if crate::secure::skip(
        "it secures its own cluster with its own CA and issuer (it runs in the plaintext pass)",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = ca_dir(tmp.path());
    for i in 1..=3 {
        cert(&d, "rm", &format!("rm{i}"));
    }
    let jwks = tmp.path().join("jwks.json");
    let issuer = Issuer::new("key-2026-12");
    write_jwks(&jwks, &[&issuer]);
    let ca_s = d.join("weft-ca.pem").display().to_string();
    let extra = format!(
        "[tls]\nca_file = {ca_s:?}\ncert_file = \"{0}/rm-rm{{id}}.pem\"\nkey_file = \"{0}/rm-rm{{id}}-key.pem\"\n\
         [acl]\nenabled = true\n\
         [acl.oidc]\nissuer = {ISSUER:?}\naudience = \"weft\"\njwks_file = {1:?}\n\
         user_claim = \"preferred_username\"\nadmin_groups = [\"ml-admins\"]\n\
         [masters]\nlaunch = false\n",
        d.display(),
        jwks.display()
    );
    let cluster = Cluster::start_with(3, 1000, &extra);
    let cx = Ctx {
        rm: cluster.addrs().join(","),
        dir: d.clone(),
    };
    let alice = issuer.token("alice", &["ml-users"], 3600);
    let bob = issuer.token("bob", &["ml-users"], 3600);
    let ops = issuer.token("ops", &["ml-users", "ml-admins"], 3600);

    // At once, through rmctl as a user's shell holds the token: no Weft
    // token was ever made (nor the cluster bootstrapped).
    let who = ok(&cx.rmctl(As::Token(&alice), &["acl", "whoami"]));
    assert_eq!(who.trim(), "alice by oidc");
    let who = ok(&cx.rmctl(As::Token(&ops), &["acl", "whoami"]));
    assert_eq!(who.trim(), "ops (admin) by oidc");

    let a1 = ok(&cx.rmctl(As::Token(&alice), &["submit", "--", "sleep", "60"]))
        .trim()
        .to_string();
    let st = ok(&cx.rmctl(As::Token(&alice), &["-o", "json", "app", "status", &a1]));
    assert!(st.contains("\"user\":\"alice\""), "{st}");
    refused(
        &cx.rmctl(As::Token(&bob), &["app", "kill", &a1]),
        &[
            "user bob (OIDC token)",
            &format!("may not kill application {a1}"),
        ],
    );
    refused(
        &cx.rmctl(As::Token(&alice), &["queue", "set", "-f", "/dev/null"]),
        &["user alice (OIDC token)", "only admins may"],
    );
    ok(&cx.rmctl(As::Token(&ops), &["app", "kill", &a1]));

    // Expired, or signed by a key the issuer does not publish (under a kid
    // it does): every ClientService call refuses them, on every member.
    let stranger = Issuer::new("key-2026-12");
    let expired = issuer.token("alice", &[], -3600);
    let forged = stranger.token("ops", &["ml-admins"], 3600);
    let ca_only = crate::tls::ca_only(&d);
    for m in &cluster.members {
        let ch = crate::tls::channel(&m.addr, &ca_only).await;
        for (t, why) in [
            (&expired, "expired"),
            (&forged, "signature does not verify"),
        ] {
            let answers = every_call(ch.clone(), Some(t)).await;
            all_refused(&answers, why, true);
            for (call, s) in &answers {
                assert!(
                    s.message().starts_with("OIDC token refused: ") && s.message().contains(why),
                    "{call}: {s:?}"
                );
            }
        }
    }

    // The issuer rotates its key: the new one is published beside the old
    // (as issuers do), and tokens signed with it work at once, with no
    // restart; the old key's tokens still do until it is withdrawn.
    let next = Issuer::new("key-2027-01");
    write_jwks(&jwks, &[&issuer, &next]);
    let carol = next.token("carol", &[], 3600);
    let who = ok(&cx.rmctl(As::Token(&carol), &["acl", "whoami"]));
    assert_eq!(who.trim(), "carol by oidc");
    ok(&cx.rmctl(As::Token(&alice), &["acl", "whoami"]));
    // Withdrawn (compromised, say): the old key's tokens are refused as
    // soon as the file no longer holds it, naming the key.
    write_jwks(&jwks, &[&next]);
    refused(
        &cx.rmctl(As::Token(&alice), &["acl", "whoami"]),
        &[
            "OIDC token refused",
            "\"key-2026-12\" is not in acl.oidc.jwks_file",
        ],
    );
    ok(&cx.rmctl(As::Token(&carol), &["acl", "whoami"]));
}
