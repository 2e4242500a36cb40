//! Operators across parents, as the attack: a parent that is not an admin
//! calling the admin RPCs learns nothing (the same PERMISSION_DENIED as for
//! another parent's id, which itself says nothing) and changes nothing; an
//! admin (`admins` in the configuration) describes and deletes another
//! parent's bubble and drains the broker from `bubblectl`; every admin
//! action is in the audit log, shown to the operator and to the owner of
//! the bubble concerned.

// Test helpers: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

use bubble_e2e_tests::*;
use bubble_proto::v1 as pb;

fn ctl(socket: &std::path::Path, args: &[&str]) -> Output {
    Command::new(ctl_bin())
        .arg("--json")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap()
}

fn ok(socket: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let out = ctl(socket, args);
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn bref(id: &str) -> pb::BubbleRef {
    pb::BubbleRef {
        bubble_id: id.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_describe_delete_and_drain_across_parents_and_others_cannot() {
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: getuid has no preconditions and cannot fail.
    let me = format!("uid:{}", unsafe { libc::getuid() });
    let b = BrokerProc::start_with(
        dir.path(),
        Opts {
            tls: true,
            config: Some(format!("admins = [\"{me}\"]\n")),
            ..Default::default()
        },
    );
    let s = b.socket.as_path();
    let mut a = b.tls_client("parent-a").await;
    let mut other = b.tls_client("parent-b").await;
    let id = a
        .create_bubble(create_req(16))
        .await
        .unwrap()
        .into_inner()
        .bubble_id;

    // Not an admin: the refusal of a foreign id, word for word, whether
    // the id exists or not; nothing changes.
    let foreign = other.describe_bubble(bref(&id)).await.unwrap_err();
    assert_eq!(foreign.code(), tonic::Code::PermissionDenied);
    let d = other.admin_describe_bubble(bref(&id)).await.unwrap_err();
    assert_eq!((d.code(), d.message()), (foreign.code(), foreign.message()));
    let x = other.admin_delete_bubble(bref(&id)).await.unwrap_err();
    assert_eq!((x.code(), x.message()), (foreign.code(), foreign.message()));
    let ghost = "b-00000000000000000000000000000000";
    let g = other.admin_describe_bubble(bref(ghost)).await.unwrap_err();
    assert_eq!(g.code(), tonic::Code::PermissionDenied);
    assert_eq!(g.message(), foreign.message().replace(&id, ghost));
    let dr = other
        .admin_drain(pb::AdminDrainRequest { drain: true })
        .await
        .unwrap_err();
    assert_eq!(dr.code(), tonic::Code::PermissionDenied);
    // The same from bubblectl: exit 17 with the JSON error.
    let url = format!("https://localhost:{}", b.tls.unwrap().port());
    let pki = b.dir.join("pki");
    for args in [
        vec!["admin", "drain"],
        vec!["admin", "describe", id.as_str()],
    ] {
        let out = Command::new(ctl_bin())
            .args(["--json", "--endpoint", &url, "--pki", pki.to_str().unwrap()])
            .args(["--parent", "parent-b"])
            .args(&args)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(out.status.code(), Some(17), "{args:?}: {v}");
        assert_eq!(v["error"]["code"], "PERMISSION_DENIED", "{v}");
    }
    assert_eq!(describe(&mut a, &id).await.state(), pb::BubbleState::Ready);
    a.create_bubble(create_req(16)).await.unwrap();

    // The admin, from bubblectl: describe and delete parent-a's bubble.
    let v = ok(s, &["--admin", "describe", &id]);
    assert_eq!(v["owner"], "cert:parent-a", "{v}");
    let v = ok(s, &["admin", "describe", &id]);
    assert_eq!(v["owner"], "cert:parent-a", "{v}");
    let listed = ctl(s, &["admin", "list", "-q"]);
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains(&id),
        "{listed:?}"
    );
    // Without --admin it is a foreign id to the admin too.
    assert_eq!(ctl(s, &["describe", &id]).status.code(), Some(17));
    let v = ok(s, &["--admin", "delete", &id]);
    assert_eq!(v["state"], "DELETED", "{v}");
    assert_eq!(
        describe(&mut a, &id).await.state(),
        pb::BubbleState::Deleted
    );

    // Drain: new bubbles refused with UNAVAILABLE, then accepted again.
    let v = ok(s, &["admin", "drain"]);
    assert_eq!(v["draining"], true, "{v}");
    assert_eq!(v["live_bubbles"], 1, "{v}");
    let st = a.create_bubble(create_req(16)).await.unwrap_err();
    assert_eq!(st.code(), tonic::Code::Unavailable, "{st:?}");
    assert!(st.message().contains("draining"), "{st:?}");
    let out = ctl(s, &["create", "--memory-mib", "16"]);
    assert_eq!(out.status.code(), Some(24), "{out:?}");
    let v = ok(s, &["admin", "drain", "--undo"]);
    assert_eq!(v["draining"], false, "{v}");
    a.create_bubble(create_req(16)).await.unwrap();

    // Audited: the operator sees its four actions under its identity; the
    // owner sees that someone else described and deleted its bubble.
    let mut admin = b.client().await;
    let recs = admin
        .list_audit(pb::ListAuditRequest::default())
        .await
        .unwrap()
        .into_inner()
        .records;
    let acts: Vec<(String, String, String)> = recs
        .iter()
        .filter(|r| r.r#type == "admin")
        .map(|r| {
            (
                r.admin_action.clone(),
                r.bubble_id.clone(),
                r.parent.clone(),
            )
        })
        .collect();
    assert_eq!(
        acts,
        vec![
            ("describe".into(), id.clone(), me.clone()),
            ("describe".into(), id.clone(), me.clone()),
            ("delete".into(), id.clone(), me.clone()),
            ("drain".into(), String::new(), me.clone()),
            ("undrain".into(), String::new(), me.clone()),
        ]
    );
    let recs = a
        .list_audit(pb::ListAuditRequest {
            bubble_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    let seen: Vec<(String, String)> = recs
        .iter()
        .filter(|r| r.r#type == "admin")
        .map(|r| (r.admin_action.clone(), r.parent.clone()))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("describe".into(), "(another parent)".into()),
            ("describe".into(), "(another parent)".into()),
            ("delete".into(), "(another parent)".into()),
        ]
    );
}

/// Draining survives a broker crash: a drained broker that is killed and
/// restarted still refuses new bubbles until an operator undoes it, and
/// the undo survives a restart too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_survives_a_broker_kill() {
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: getuid has no preconditions and cannot fail.
    let me = format!("uid:{}", unsafe { libc::getuid() });
    let opts = Opts {
        config: Some(format!("admins = [\"{me}\"]\n")),
        ..Default::default()
    };
    let mut b = BrokerProc::start_with(dir.path(), opts.clone());
    let v = ok(&b.socket, &["admin", "drain"]);
    assert_eq!(v["draining"], true, "{v}");
    b.kill();
    let mut b = BrokerProc::start_with(dir.path(), opts.clone());
    let mut c = b.client().await;
    let st = c.create_bubble(create_req(16)).await.unwrap_err();
    assert_eq!(st.code(), tonic::Code::Unavailable, "{st:?}");
    let st = c
        .attach_bubble(pb::AttachBubbleRequest {
            profile: "none".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::Unavailable, "{st:?}");
    let v = ok(&b.socket, &["admin", "drain", "--undo"]);
    assert_eq!(v["draining"], false, "{v}");
    b.kill();
    let b = BrokerProc::start_with(dir.path(), opts);
    let mut c = b.client().await;
    let r = c.create_bubble(create_req(16)).await.unwrap().into_inner();
    assert_eq!(r.state, pb::BubbleState::Ready as i32);
}
