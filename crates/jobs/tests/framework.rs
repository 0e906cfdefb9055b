//! The job framework driven through a fake driver on a current-thread runtime + LocalSet in
//! virtual time: the event sequences of qemu-storage-daemon (recorded from qsd 10.0 with
//! null-co and blkdebug nodes), every verb in every status, the speed limit and the
//! back-off under `ignore`.

mod common;

use common::*;
use jobs::{IoStatus, JobStatus, JobTxn, JobVerb, OnError};
use qapi::error::ErrorClass;
use serde_json::{json, Map};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

const MIB: usize = 1 << 20;

fn eio(chunk: usize, is_read: bool, times: u32) -> Fault {
    Fault {
        chunk,
        is_read,
        errno: libc::EIO,
        times,
    }
}

#[tokio::test(start_paused = true)]
async fn success_sequence_and_payload() {
    local(async {
        let (mgr, rec) = manager();
        let (job, fake) = spawn(&mgr, knobs(MIB), opts("j1"));
        job.wait_concluded().await;
        assert_eq!(
            rec.seq("j1"),
            strs(&[
                "created",
                "running",
                "waiting",
                "pending",
                "COMPLETED",
                "concluded",
                "null"
            ])
        );
        assert_eq!(
            rec.payload("j1", "BLOCK_JOB_COMPLETED"),
            json!({"type": "backup", "device": "j1", "len": MIB, "offset": MIB, "speed": 0})
        );
        assert_eq!(
            rec.payload("j1", "JOB_STATUS_CHANGE"),
            json!({"id": "j1", "status": "null"})
        );
        assert!(fake.copied_all());
        assert_eq!(fake.calls(), strs(&["prepare", "commit", "clean"]));
        assert!(mgr.query_jobs().is_empty());
        assert!(mgr.get("j1").is_none());
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn cancel_while_running() {
    local(async {
        let (mgr, rec) = manager();
        let mut o = opts("j1");
        o.speed = (CHUNK * 2) as i64;
        let (job, fake) = spawn(&mgr, knobs(MIB), o);
        tokio::time::sleep(Duration::from_secs(2)).await;
        mgr.block_job_cancel("j1", false).await.unwrap();
        job.wait_concluded().await;
        assert_eq!(
            rec.seq("j1"),
            strs(&[
                "created",
                "running",
                "aborting",
                "CANCELLED",
                "concluded",
                "null"
            ])
        );
        let cancelled = rec.payload("j1", "BLOCK_JOB_CANCELLED");
        assert_eq!(cancelled["len"], json!(MIB));
        assert_eq!(cancelled["speed"], json!(CHUNK * 2));
        assert!(cancelled.get("error").is_none());
        let offset = cancelled["offset"].as_u64().unwrap();
        assert!(offset > 0 && offset < MIB as u64, "{offset}");
        assert_eq!(fake.calls(), strs(&["abort", "clean"]));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn error_report_write_and_read() {
    local(async {
        for (is_read, operation) in [(false, "write"), (true, "read")] {
            let (mgr, rec) = manager();
            let mut k = knobs(MIB);
            k.faults = vec![eio(3, is_read, u32::MAX)];
            let (job, fake) = spawn(&mgr, k, opts("j1"));
            job.wait_concluded().await;
            assert_eq!(
                rec.seq("j1"),
                strs(&[
                    "created",
                    "running",
                    "ERROR",
                    "aborting",
                    "COMPLETED",
                    "concluded",
                    "null"
                ])
            );
            assert_eq!(
                rec.payload("j1", "BLOCK_JOB_ERROR"),
                json!({"device": "j1", "operation": operation, "action": "report"})
            );
            assert_eq!(
                rec.payload("j1", "BLOCK_JOB_COMPLETED"),
                json!({"type": "backup", "device": "j1", "len": MIB, "offset": 3 * CHUNK,
                       "speed": 0, "error": "Input/output error"})
            );
            assert_eq!(fake.calls(), strs(&["abort", "clean"]));
        }
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn error_ignore_retries_then_completes() {
    local(async {
        let (mgr, rec) = manager();
        let mut k = knobs(MIB);
        k.faults = vec![eio(2, false, 3)];
        let mut o = opts("j1");
        o.on_target_error = OnError::Ignore;
        let (job, fake) = spawn(&mgr, k, o);
        job.wait_concluded().await;
        assert_eq!(
            rec.seq("j1"),
            strs(&[
                "created",
                "running",
                "ERROR",
                "ERROR",
                "ERROR",
                "waiting",
                "pending",
                "COMPLETED",
                "concluded",
                "null"
            ])
        );
        assert_eq!(
            rec.payload("j1", "BLOCK_JOB_ERROR"),
            json!({"device": "j1", "operation": "write", "action": "ignore"})
        );
        assert!(rec
            .payload("j1", "BLOCK_JOB_COMPLETED")
            .get("error")
            .is_none());
        assert!(fake.copied_all());
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn error_ignore_skipping_fails_at_the_end() {
    local(async {
        let (mgr, rec) = manager();
        let mut k = knobs(MIB);
        k.faults = vec![eio(1, true, u32::MAX)];
        k.skip_on_ignore = true;
        let mut o = opts("j1");
        o.on_source_error = OnError::Ignore;
        let (job, _fake) = spawn(&mgr, k, o);
        job.wait_concluded().await;
        assert_eq!(
            rec.seq("j1"),
            strs(&[
                "created",
                "running",
                "ERROR",
                "aborting",
                "COMPLETED",
                "concluded",
                "null"
            ])
        );
        let completed = rec.payload("j1", "BLOCK_JOB_COMPLETED");
        assert_eq!(completed["error"], json!("Input/output error"));
        assert_eq!(completed["offset"], json!(MIB - CHUNK));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn error_stop_then_resume() {
    local(async {
        let (mgr, rec) = manager();
        let mut k = knobs(MIB);
        k.faults = vec![eio(2, false, 1)];
        let mut o = opts("j1");
        o.on_target_error = OnError::Stop;
        let (job, fake) = spawn(&mgr, k, o);
        rec.wait_for("j1", "paused").await;
        assert_eq!(
            rec.seq("j1"),
            strs(&["created", "running", "ERROR", "paused"])
        );
        assert_eq!(
            rec.payload("j1", "BLOCK_JOB_ERROR"),
            json!({"device": "j1", "operation": "write", "action": "stop"})
        );
        let row = &mgr.query_block_jobs()[0];
        assert_eq!(row["status"], json!("paused"));
        assert_eq!(row["io-status"], json!("failed"));
        assert_eq!(row["paused"], json!(true));
        assert_eq!(row["busy"], json!(false));
        let err = mgr.block_job_cancel("j1", false).await.unwrap_err();
        assert_eq!(
            err.desc,
            "The block job for device 'j1' is currently paused"
        );
        mgr.block_job_resume("j1").unwrap();
        assert_eq!(job.io_status(), IoStatus::Ok);
        job.wait_concluded().await;
        assert_eq!(
            rec.seq("j1"),
            strs(&[
                "created",
                "running",
                "ERROR",
                "paused",
                "running",
                "waiting",
                "pending",
                "COMPLETED",
                "concluded",
                "null"
            ])
        );
        assert!(rec
            .payload("j1", "BLOCK_JOB_COMPLETED")
            .get("error")
            .is_none());
        assert!(fake.copied_all());
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn error_enospc_policy() {
    local(async {
        // ENOSPC stops with io-status nospace; job-cancel then force-cancels.
        let (mgr, rec) = manager();
        let mut k = knobs(MIB);
        k.faults = vec![Fault {
            chunk: 1,
            is_read: false,
            errno: libc::ENOSPC,
            times: u32::MAX,
        }];
        let mut o = opts("e1");
        o.on_target_error = OnError::Enospc;
        let (job, _) = spawn(&mgr, k, o);
        rec.wait_for("e1", "paused").await;
        assert_eq!(mgr.query_block_jobs()[0]["io-status"], json!("nospace"));
        assert_eq!(
            rec.payload("e1", "BLOCK_JOB_ERROR")["action"],
            json!("stop")
        );
        mgr.job_cancel("e1").await.unwrap();
        job.wait_concluded().await;
        assert_eq!(
            rec.seq("e1"),
            strs(&[
                "created",
                "running",
                "ERROR",
                "paused",
                "running",
                "aborting",
                "CANCELLED",
                "concluded",
                "null"
            ])
        );

        // Any other error is reported.
        let mut k = knobs(MIB);
        k.faults = vec![eio(1, false, u32::MAX)];
        let mut o = opts("e2");
        o.on_target_error = OnError::Enospc;
        let (job, _) = spawn(&mgr, k, o);
        job.wait_concluded().await;
        assert_eq!(
            rec.payload("e2", "BLOCK_JOB_ERROR")["action"],
            json!("report")
        );
        assert_eq!(
            rec.payload("e2", "BLOCK_JOB_COMPLETED")["error"],
            json!("Input/output error")
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn auto_finalize_false_waits_for_finalize() {
    local(async {
        let (mgr, rec) = manager();
        let mut o = opts("j1");
        o.auto_finalize = false;
        let (job, fake) = spawn(&mgr, knobs(MIB), o);
        rec.wait_for("j1", "PENDING").await;
        assert_eq!(
            rec.seq("j1"),
            strs(&["created", "running", "waiting", "pending", "PENDING"])
        );
        assert_eq!(
            rec.payload("j1", "BLOCK_JOB_PENDING"),
            json!({"type": "backup", "id": "j1"})
        );
        assert_eq!(job.status(), JobStatus::Pending);
        assert!(fake.calls().is_empty());
        mgr.job_finalize("j1").await.unwrap();
        // Finalisation happened before job-finalize returned, as in QEMU.
        assert_eq!(
            rec.seq("j1"),
            strs(&[
                "created",
                "running",
                "waiting",
                "pending",
                "PENDING",
                "COMPLETED",
                "concluded",
                "null"
            ])
        );
        assert_eq!(fake.calls(), strs(&["prepare", "commit", "clean"]));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn auto_dismiss_false_waits_for_dismiss() {
    local(async {
        let (mgr, rec) = manager();
        let mut o = opts("j1");
        o.auto_dismiss = false;
        let (job, _) = spawn(&mgr, knobs(MIB), o);
        job.wait_concluded().await;
        assert_eq!(
            rec.seq("j1"),
            strs(&[
                "created",
                "running",
                "waiting",
                "pending",
                "COMPLETED",
                "concluded"
            ])
        );
        let row = &mgr.query_block_jobs()[0];
        assert_eq!(row["status"], json!("concluded"));
        assert!(row.get("error").is_none());
        mgr.block_job_dismiss("j1").unwrap();
        assert_eq!(rec.seq("j1").last().unwrap(), "null");
        assert!(mgr.query_block_jobs().is_empty());
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn cancel_in_pending() {
    local(async {
        let (mgr, rec) = manager();
        let mut o = opts("j2");
        o.auto_finalize = false;
        o.auto_dismiss = false;
        let (_job, fake) = spawn(&mgr, knobs(MIB), o);
        rec.wait_for("j2", "PENDING").await;
        mgr.block_job_cancel("j2", false).await.unwrap();
        assert_eq!(
            rec.seq("j2"),
            strs(&[
                "created",
                "running",
                "waiting",
                "pending",
                "PENDING",
                "aborting",
                "CANCELLED",
                "concluded"
            ])
        );
        assert_eq!(
            rec.payload("j2", "BLOCK_JOB_CANCELLED"),
            json!({"type": "backup", "device": "j2", "len": MIB, "offset": MIB, "speed": 0})
        );
        assert_eq!(
            mgr.query_block_jobs()[0]["error"],
            json!("Operation canceled")
        );
        assert_eq!(
            mgr.query_jobs(),
            vec![json!({"id": "j2", "type": "backup", "status": "concluded",
                        "current-progress": MIB, "total-progress": MIB,
                        "error": "Operation canceled"})]
        );
        assert_eq!(fake.calls(), strs(&["abort", "clean"]));
        mgr.job_dismiss("j2").unwrap();
        assert_eq!(rec.seq("j2").last().unwrap(), "null");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn user_pause_and_resume() {
    local(async {
        let (mgr, rec) = manager();
        let mut o = opts("j1");
        o.speed = (CHUNK * 4) as i64;
        let (job, _) = spawn(&mgr, knobs(MIB), o);
        mgr.block_job_pause("j1").unwrap();
        // Paused or about to pause.
        assert_eq!(mgr.query_block_jobs()[0]["paused"], json!(true));
        assert_eq!(
            mgr.block_job_pause("j1").unwrap_err().desc,
            "Job is already paused"
        );
        rec.wait_for("j1", "paused").await;
        let offset = mgr.query_jobs()[0]["current-progress"].clone();
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(mgr.query_jobs()[0]["current-progress"], offset);
        mgr.job_resume("j1").unwrap();
        assert_eq!(
            mgr.job_resume("j1").unwrap_err().desc,
            "Can't resume a job that was not paused"
        );
        rec.wait_nth("j1", "running", 2).await;
        // A force cancel of a paused job resumes it first.
        mgr.job_pause("j1").unwrap();
        rec.wait_nth("j1", "paused", 2).await;
        mgr.block_job_cancel("j1", true).await.unwrap();
        job.wait_concluded().await;
        let seq = rec.seq("j1");
        assert_eq!(
            seq,
            strs(&[
                "created",
                "running",
                "paused",
                "running",
                "paused",
                "running",
                "aborting",
                "CANCELLED",
                "concluded",
                "null"
            ])
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn mirror_ready_complete_and_standby() {
    local(async {
        let (mgr, rec) = manager();
        let mut k = knobs(MIB);
        k.mirror = true;
        let (job, fake) = spawn(&mgr, k, opts("m1"));
        rec.wait_for("m1", "READY").await;
        assert_eq!(
            rec.payload("m1", "BLOCK_JOB_READY"),
            json!({"type": "mirror", "device": "m1", "len": MIB, "offset": MIB, "speed": 0})
        );
        let row = &mgr.query_block_jobs()[0];
        assert_eq!(row["ready"], json!(true));
        assert_eq!(row["actively-synced"], json!(false));
        mgr.block_job_pause("m1").unwrap();
        rec.wait_for("m1", "standby").await;
        assert_eq!(mgr.query_block_jobs()[0]["ready"], json!(true));
        mgr.block_job_resume("m1").unwrap();
        mgr.block_job_complete("m1").unwrap();
        job.wait_concluded().await;
        assert_eq!(
            rec.seq("m1"),
            strs(&[
                "created",
                "running",
                "ready",
                "READY",
                "standby",
                "ready",
                "waiting",
                "pending",
                "COMPLETED",
                "concluded",
                "null"
            ])
        );
        assert_eq!(fake.calls(), strs(&["pivot", "prepare", "commit", "clean"]));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn mirror_soft_and_force_cancel_in_ready() {
    local(async {
        let (mgr, rec) = manager();
        for (id, force) in [("soft", false), ("force", true)] {
            let mut k = knobs(MIB);
            k.mirror = true;
            let (job, fake) = spawn(&mgr, k, opts(id));
            rec.wait_for(id, "READY").await;
            mgr.block_job_cancel(id, force).await.unwrap();
            job.wait_concluded().await;
            let (end, calls) = if force {
                (
                    &["aborting", "CANCELLED", "concluded", "null"][..],
                    strs(&["abort", "clean"]),
                )
            } else {
                (
                    &["waiting", "pending", "COMPLETED", "concluded", "null"][..],
                    strs(&["prepare", "commit", "clean"]),
                )
            };
            let mut want = strs(&["created", "running", "ready", "READY"]);
            want.extend(strs(end));
            assert_eq!(rec.seq(id), want, "{id}");
            // No pivot either way.
            assert_eq!(fake.calls(), calls, "{id}");
        }
        assert_eq!(
            rec.payload("force", "BLOCK_JOB_CANCELLED")["offset"],
            json!(MIB)
        );

        // Before READY a soft cancel is a force cancel.
        let mut k = knobs(MIB);
        k.mirror = true;
        let mut o = opts("early");
        o.speed = CHUNK as i64;
        let (job, _) = spawn(&mgr, k, o);
        mgr.block_job_cancel("early", false).await.unwrap();
        job.wait_concluded().await;
        assert_eq!(
            rec.seq("early"),
            strs(&[
                "created",
                "running",
                "aborting",
                "CANCELLED",
                "concluded",
                "null"
            ])
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn complete_refused_for_other_jobs_and_after_cancel() {
    local(async {
        let (mgr, rec) = manager();
        let mut k = knobs(MIB);
        k.mirror = true;
        k.hold = Some(Arc::new(Semaphore::new(0)));
        let hold = k.hold.clone().unwrap();
        let (job, _) = spawn(&mgr, k, opts("m1"));
        rec.wait_for("m1", "READY").await;
        // Soft cancel requested: the job leaves READY only when its work returns.
        mgr.block_job_cancel("m1", false).await.unwrap();
        assert_eq!(
            mgr.block_job_complete("m1").unwrap_err().desc,
            "The active block job 'm1' cannot be completed"
        );
        hold.add_permits(1);
        job.wait_concluded().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn transaction_abort_cancels_the_others() {
    local(async {
        let (mgr, rec) = manager();
        let txn = JobTxn::new();
        let mut a = opts("a");
        a.speed = CHUNK as i64;
        a.txn = Some(txn.clone());
        let (job_a, fake_a) = spawn(&mgr, knobs(MIB), a);
        let mut kb = knobs(MIB);
        kb.faults = vec![eio(0, false, u32::MAX)];
        let mut b = opts("b");
        b.txn = Some(txn.clone());
        let (job_b, fake_b) = spawn(&mgr, kb, b);
        job_a.wait_concluded().await;
        job_b.wait_concluded().await;
        assert_eq!(
            rec.all(),
            strs(&[
                "a:created",
                "a:running",
                "b:created",
                "b:running",
                "b:ERROR",
                "b:aborting",
                "a:aborting",
                "b:COMPLETED",
                "b:concluded",
                "b:null",
                "a:CANCELLED",
                "a:concluded",
                "a:null"
            ])
        );
        assert_eq!(
            rec.payload("b", "BLOCK_JOB_COMPLETED")["error"],
            json!("Input/output error")
        );
        assert_eq!(fake_a.calls(), strs(&["abort", "clean"]));
        assert_eq!(fake_b.calls(), strs(&["abort", "clean"]));
        assert!(txn.is_empty());
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn transaction_jobs_wait_for_each_other() {
    local(async {
        let (mgr, rec) = manager();
        let txn = JobTxn::new();
        let mut a = opts("a");
        a.txn = Some(txn.clone());
        let (job_a, fake_a) = spawn(&mgr, knobs(MIB), a);
        let mut b = opts("b");
        b.speed = (4 * CHUNK) as i64;
        b.txn = Some(txn.clone());
        let (job_b, fake_b) = spawn(&mgr, knobs(MIB), b);
        rec.wait_for("a", "waiting").await;
        assert_eq!(job_a.status(), JobStatus::Waiting);
        assert_eq!(job_b.status(), JobStatus::Running);
        job_b.wait_concluded().await;
        assert_eq!(
            rec.all()[4..],
            strs(&[
                "a:waiting",
                "b:waiting",
                "b:pending",
                "a:pending",
                "b:COMPLETED",
                "b:concluded",
                "b:null",
                "a:COMPLETED",
                "a:concluded",
                "a:null"
            ])
        );
        assert_eq!(fake_a.calls(), strs(&["prepare", "commit", "clean"]));
        assert_eq!(fake_b.calls(), strs(&["prepare", "commit", "clean"]));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn cancel_in_waiting_aborts_the_transaction() {
    local(async {
        let (mgr, rec) = manager();
        let txn = JobTxn::new();
        let mut a = opts("h1");
        a.speed = CHUNK as i64;
        a.txn = Some(txn.clone());
        let (job_a, _) = spawn(&mgr, knobs(MIB), a);
        let mut b = opts("h2");
        b.txn = Some(txn.clone());
        let (job_b, _) = spawn(&mgr, knobs(MIB), b);
        rec.wait_for("h2", "waiting").await;
        mgr.block_job_cancel("h2", false).await.unwrap();
        // As qsd: the cancel returns once the whole transaction is finalised.
        assert_eq!(job_a.status(), JobStatus::Null);
        assert_eq!(job_b.status(), JobStatus::Null);
        assert_eq!(
            rec.all()[4..],
            strs(&[
                "h2:waiting",
                "h2:aborting",
                "h1:aborting",
                "h2:CANCELLED",
                "h2:concluded",
                "h2:null",
                "h1:CANCELLED",
                "h1:concluded",
                "h1:null"
            ])
        );
        assert_eq!(
            rec.payload("h2", "BLOCK_JOB_CANCELLED")["offset"],
            json!(MIB)
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn prepare_failure_aborts_the_transaction() {
    local(async {
        let (mgr, rec) = manager();
        let txn = JobTxn::new();
        let mut a = opts("a");
        a.txn = Some(txn.clone());
        let (_, fake_a) = spawn(&mgr, knobs(MIB), a);
        let mut kb = knobs(MIB);
        kb.prepare_fails = true;
        let mut b = opts("b");
        b.txn = Some(txn.clone());
        let (job_b, fake_b) = spawn(&mgr, kb, b);
        job_b.wait_concluded().await;
        assert_eq!(
            rec.seq("b")[2..],
            strs(&[
                "waiting",
                "pending",
                "aborting",
                "COMPLETED",
                "concluded",
                "null"
            ])
        );
        assert_eq!(
            rec.payload("b", "BLOCK_JOB_COMPLETED")["error"],
            json!("prepare failed")
        );
        assert_eq!(
            rec.seq("a")[2..],
            strs(&[
                "waiting",
                "pending",
                "aborting",
                "CANCELLED",
                "concluded",
                "null"
            ])
        );
        assert_eq!(fake_b.calls(), strs(&["prepare", "abort", "clean"]));
        assert_eq!(fake_a.calls(), strs(&["abort", "clean"]));
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn creation_rules_and_lookups() {
    local(async {
        let (mgr, rec) = manager();
        let fake = Fake::new(knobs(MIB));
        let err = mgr.create(fake.clone(), opts("1j")).unwrap_err();
        assert_eq!(err.desc, "Invalid job ID '1j'");
        let err = mgr.create(fake.clone(), opts("")).unwrap_err();
        assert_eq!(err.desc, "Invalid job ID ''");
        assert!(rec.events().is_empty());

        let mut o = opts("j5");
        o.speed = -1;
        let err = mgr.create(fake.clone(), o).unwrap_err();
        assert_eq!(err.desc, "Parameter 'speed' expects a non-negative value");
        assert_eq!(rec.seq("j5"), strs(&["created", "null"]));
        assert!(mgr.get("j5").is_none());

        let job = mgr.create(fake.clone(), opts("j1")).unwrap();
        let err = mgr.create(fake.clone(), opts("j1")).unwrap_err();
        assert_eq!(err.desc, "Job ID 'j1' already in use");
        assert_eq!(err.class, ErrorClass::GenericError);
        // A created job is paused until started.
        assert_eq!(mgr.query_block_jobs()[0]["paused"], json!(true));
        job.early_fail();
        assert_eq!(rec.seq("j1"), strs(&["created", "null"]));

        let err = mgr.block_job_cancel("nope", true).await.unwrap_err();
        assert_eq!(err.class, ErrorClass::DeviceNotActive);
        assert_eq!(err.desc, "Block job 'nope' not found");
        for err in [
            mgr.block_job_pause("nope").unwrap_err(),
            mgr.block_job_resume("nope").unwrap_err(),
            mgr.block_job_set_speed("nope", 0).unwrap_err(),
            mgr.block_job_complete("nope").unwrap_err(),
            mgr.block_job_finalize("nope").await.unwrap_err(),
            mgr.block_job_dismiss("nope").unwrap_err(),
            mgr.block_job_change("nope", &Map::new()).unwrap_err(),
        ] {
            assert_eq!(err.class, ErrorClass::DeviceNotActive);
        }
        for err in [
            mgr.job_cancel("nope").await.unwrap_err(),
            mgr.job_pause("nope").unwrap_err(),
            mgr.job_resume("nope").unwrap_err(),
            mgr.job_complete("nope").unwrap_err(),
            mgr.job_finalize("nope").await.unwrap_err(),
            mgr.job_dismiss("nope").unwrap_err(),
        ] {
            assert_eq!(err.class, ErrorClass::GenericError);
            assert_eq!(err.desc, "Job not found");
        }

        let err = mgr.block_job_set_speed("nope", -1).unwrap_err();
        assert_eq!(err.class, ErrorClass::DeviceNotActive);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn unstarted_jobs_of_a_failed_transaction() {
    local(async {
        let (mgr, rec) = manager();
        let txn = JobTxn::new();
        let mut created = Vec::new();
        for id in ["t1", "t2"] {
            let mut o = opts(id);
            o.txn = Some(txn.clone());
            let fake = Fake::new(knobs(MIB));
            created.push((mgr.create(fake.clone(), o).unwrap(), fake));
        }
        created[0].0.cancel_sync().await;
        for (job, fake) in &created {
            assert_eq!(job.status(), JobStatus::Null);
            assert_eq!(fake.calls(), strs(&["abort", "clean"]));
        }
        assert_eq!(
            rec.all(),
            strs(&[
                "t1:created",
                "t2:created",
                "t1:aborting",
                "t2:aborting",
                "t2:concluded",
                "t2:null",
                "t1:concluded",
                "t1:null"
            ])
        );
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn query_rows() {
    local(async {
        let (mgr, rec) = manager();
        let mut o = opts("j1");
        o.speed = CHUNK as i64;
        let (_job, _) = spawn(&mgr, knobs(MIB), o);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let row = mgr.query_block_jobs()[0].clone();
        let keys: Vec<&str> = row
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(
            keys,
            [
                "type",
                "device",
                "len",
                "offset",
                "busy",
                "paused",
                "speed",
                "io-status",
                "ready",
                "status",
                "auto-finalize",
                "auto-dismiss"
            ]
        );
        assert_eq!(row["type"], json!("backup"));
        assert_eq!(row["len"], json!(MIB));
        assert_eq!(row["paused"], json!(false));
        assert_eq!(row["speed"], json!(CHUNK));
        assert_eq!(row["io-status"], json!("ok"));
        assert_eq!(row["ready"], json!(false));
        assert_eq!(row["status"], json!("running"));
        assert_eq!(row["auto-finalize"], json!(true));
        let offset = row["offset"].as_u64().unwrap();
        assert!(offset > 0 && offset < MIB as u64);
        let job_row = mgr.query_jobs()[0].clone();
        let keys: Vec<&str> = job_row
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(
            keys,
            ["id", "type", "status", "current-progress", "total-progress"]
        );
        // Newest first, as QEMU lists them.
        let (_j2, _) = spawn(&mgr, knobs(MIB), opts("j2"));
        let ids: Vec<_> = mgr.query_jobs().iter().map(|r| r["id"].clone()).collect();
        assert_eq!(ids, [json!("j2"), json!("j1")]);
        mgr.cancel_all_and_wait().await;
        assert_eq!(rec.seq("j1").last().unwrap(), "null");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn cancel_all_and_wait_stops_everything() {
    local(async {
        let (mgr, rec) = manager();
        let mut running = opts("running");
        running.speed = CHUNK as i64;
        spawn(&mgr, knobs(MIB), running);
        let mut mk = knobs(MIB);
        mk.mirror = true;
        spawn(&mgr, mk, opts("ready"));
        let mut paused = opts("paused");
        paused.speed = CHUNK as i64;
        spawn(&mgr, knobs(MIB), paused);
        mgr.job_pause("paused").unwrap();
        let mut pending = opts("pending");
        pending.auto_finalize = false;
        spawn(&mgr, knobs(MIB), pending);
        let mut concluded = opts("concluded");
        concluded.auto_dismiss = false;
        spawn(&mgr, knobs(MIB), concluded);
        let unstarted = mgr.create(Fake::new(knobs(MIB)), opts("created")).unwrap();
        rec.wait_for("ready", "READY").await;
        rec.wait_for("paused", "paused").await;
        rec.wait_for("pending", "PENDING").await;
        rec.wait_for("concluded", "concluded").await;

        mgr.cancel_all_and_wait().await;
        for id in ["running", "ready", "paused", "pending"] {
            assert_eq!(rec.seq(id).last().unwrap(), "null", "{id}");
            assert!(rec.seq(id).contains(&"CANCELLED".to_string()), "{id}");
        }
        assert_eq!(
            rec.seq("created"),
            strs(&["created", "aborting", "concluded", "null"])
        );
        assert_eq!(unstarted.status(), JobStatus::Null);
        assert_eq!(mgr.jobs().len(), 1);
        assert_eq!(mgr.jobs()[0].status(), JobStatus::Concluded);
    })
    .await;
}

/// Set up a job in `status`; returns it and whatever must stay alive.
async fn job_in(
    mgr: &Arc<jobs::JobManager>,
    rec: &Recorder,
    status: JobStatus,
    hold: &Arc<Semaphore>,
) -> Arc<jobs::Job> {
    let slow = |id: &str| {
        let mut o = opts(id);
        o.speed = CHUNK as i64;
        o
    };
    let mirror = || {
        let mut k = knobs(MIB);
        k.mirror = true;
        k
    };
    match status {
        JobStatus::Created => mgr.create(Fake::new(knobs(MIB)), opts("x")).unwrap(),
        JobStatus::Running => spawn(mgr, knobs(MIB), slow("x")).0,
        JobStatus::Paused => {
            let job = spawn(mgr, knobs(MIB), slow("x")).0;
            job.user_pause().unwrap();
            rec.wait_for("x", "paused").await;
            job
        }
        JobStatus::Ready => {
            let job = spawn(mgr, mirror(), opts("x")).0;
            rec.wait_for("x", "READY").await;
            job
        }
        JobStatus::Standby => {
            let job = spawn(mgr, mirror(), opts("x")).0;
            rec.wait_for("x", "READY").await;
            job.user_pause().unwrap();
            rec.wait_for("x", "standby").await;
            job
        }
        JobStatus::Waiting => {
            let txn = JobTxn::new();
            let mut partner = slow("partner");
            partner.txn = Some(txn.clone());
            spawn(mgr, knobs(MIB), partner);
            let mut o = opts("x");
            o.txn = Some(txn);
            let job = spawn(mgr, knobs(MIB), o).0;
            rec.wait_for("x", "waiting").await;
            job
        }
        JobStatus::Pending => {
            let mut o = opts("x");
            o.auto_finalize = false;
            let job = spawn(mgr, knobs(MIB), o).0;
            rec.wait_for("x", "PENDING").await;
            job
        }
        JobStatus::Aborting => {
            let txn = JobTxn::new();
            let mut partner = opts("partner");
            partner.txn = Some(txn.clone());
            let mut k = knobs(MIB);
            k.hold = Some(hold.clone());
            spawn(mgr, k, partner);
            let mut o = opts("x");
            o.txn = Some(txn);
            let mut k = knobs(MIB);
            k.faults = vec![eio(0, false, u32::MAX)];
            let job = spawn(mgr, k, o).0;
            rec.wait_for("x", "aborting").await;
            job
        }
        JobStatus::Concluded => {
            let mut o = opts("x");
            o.auto_dismiss = false;
            let job = spawn(mgr, knobs(MIB), o).0;
            rec.wait_for("x", "concluded").await;
            job
        }
        JobStatus::Null => unreachable!("a job in null is gone"),
    }
}

#[tokio::test(start_paused = true)]
async fn every_verb_in_every_status() {
    local(async {
        let statuses = JobStatus::ALL.into_iter().filter(|s| *s != JobStatus::Null);
        for status in statuses {
            for verb in JobVerb::ALL {
                // cancel and finalize wait for a transaction step that is in progress
                // while a job aborts (as qsd, which does not answer meanwhile).
                if status == JobStatus::Aborting
                    && matches!(verb, JobVerb::Cancel | JobVerb::Finalize)
                {
                    continue;
                }
                let (mgr, rec) = manager();
                let hold = Arc::new(Semaphore::new(0));
                let job = job_in(&mgr, &rec, status, &hold).await;
                assert_eq!(job.status(), status);
                let user_paused = matches!(status, JobStatus::Paused | JobStatus::Standby);
                let mirror = matches!(status, JobStatus::Ready | JobStatus::Standby);
                let refusal =
                    format!("Job 'x' in state '{status}' cannot accept command verb '{verb}'");
                let expected: Result<(), String> = match verb {
                    JobVerb::Resume if !user_paused => {
                        Err("Can't resume a job that was not paused".into())
                    }
                    _ if !status.accepts(verb) => Err(refusal),
                    JobVerb::Pause if user_paused => Err("Job is already paused".into()),
                    JobVerb::Change if !mirror => Err("Job type does not support change".into()),
                    _ => Ok(()),
                };
                let got = match verb {
                    JobVerb::Cancel => job.cancel(true).await,
                    JobVerb::Pause => job.user_pause(),
                    JobVerb::Resume => job.user_resume(),
                    JobVerb::SetSpeed => job.set_speed(1000),
                    JobVerb::Complete => job.complete(),
                    JobVerb::Finalize => job.finalize().await,
                    JobVerb::Dismiss => job.dismiss(),
                    JobVerb::Change => job.change(&Map::new()),
                };
                let got = got.map_err(|e| {
                    assert_eq!(e.class, ErrorClass::GenericError);
                    e.desc
                });
                assert_eq!(got, expected, "{verb} in {status}");
                hold.add_permits(10);
                mgr.cancel_all_and_wait().await;
                if let Some(left) = mgr.get("x") {
                    assert_eq!(left.status(), JobStatus::Concluded, "{verb} in {status}");
                }
            }
        }
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn speed_limit_in_virtual_time() {
    local(async {
        let (mgr, _rec) = manager();
        let mut o = opts("j1");
        o.speed = 8 << 20;
        let start = Instant::now();
        let (job, fake) = spawn(&mgr, knobs(32 * MIB), o);
        job.wait_concluded().await;
        let secs = start.elapsed().as_secs_f64();
        assert!((secs - 4.0).abs() <= 0.1 + 1e-6, "took {secs} s");
        assert!(fake.copied_all());
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn set_speed_wakes_a_sleeping_job() {
    local(async {
        let (mgr, rec) = manager();
        for (id, new_speed) in [("lift", 0), ("raise", 1 << 30)] {
            let mut o = opts(id);
            // One byte a second: the first chunk alone means a sleep of 18 hours.
            o.speed = 1;
            let start = Instant::now();
            let (job, _) = spawn(&mgr, knobs(MIB), o);
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(job.status(), JobStatus::Running);
            assert_eq!(mgr.query_block_jobs()[0]["busy"], json!(false));
            mgr.block_job_set_speed(id, new_speed).unwrap();
            job.wait_concluded().await;
            let secs = start.elapsed().as_secs_f64();
            assert!(secs < 2.0, "{id}: took {secs} s");
            assert_eq!(
                rec.payload(id, "BLOCK_JOB_COMPLETED")["speed"],
                json!(new_speed)
            );
        }
        let (job, _) = spawn(&mgr, knobs(MIB), opts("neg"));
        assert_eq!(
            job.set_speed(-1).unwrap_err().desc,
            "Parameter 'speed' expects a non-negative value"
        );
        job.wait_concluded().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn persistent_error_under_ignore_backs_off() {
    local(async {
        let (mgr, rec) = manager();
        let mut k = knobs(MIB);
        k.faults = vec![eio(1, false, u32::MAX)];
        let mut o = opts("j1");
        o.on_target_error = OnError::Ignore;
        let (job, fake) = spawn(&mgr, k, o);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let attempts = fake.error_calls.load(Ordering::Relaxed);
        let events = rec
            .seq("j1")
            .iter()
            .filter(|s| s.as_str() == "ERROR")
            .count();
        // qsd: ~4000 events in 10 s. Back-off: 10 ms doubling to 1 s => about 17 attempts;
        // events: a burst of 5, then one a second.
        assert!((10..=20).contains(&attempts), "{attempts} attempts");
        assert!((5..=16).contains(&events), "{events} events");
        assert_eq!(mgr.query_jobs()[0]["current-progress"], json!(CHUNK));
        mgr.job_cancel("j1").await.unwrap();
        job.wait_concluded().await;
        assert_eq!(
            rec.seq("j1")[rec.seq("j1").len() - 4..],
            strs(&["aborting", "CANCELLED", "concluded", "null"])
        );
    })
    .await;
}

/// A driver that panics (a bug) fails its job like an error would: the job ends, aborts
/// and reports the panic; the manager and the runtime go on.
#[tokio::test(start_paused = true)]
async fn a_panicking_driver_fails_its_job() {
    local(async {
        let (mgr, rec) = manager();
        let mut k = knobs(MIB);
        k.panic_at_chunk = Some(2);
        let (job, fake) = spawn(&mgr, k, opts("j1"));
        job.wait_concluded().await;
        assert_eq!(
            rec.seq("j1"),
            strs(&[
                "created",
                "running",
                "aborting",
                "COMPLETED",
                "concluded",
                "null"
            ])
        );
        assert_eq!(
            rec.payload("j1", "BLOCK_JOB_COMPLETED"),
            json!({"type": "backup", "device": "j1", "len": MIB, "offset": 2 * CHUNK,
                   "speed": 0, "error": "internal error: driver bug at chunk 2"})
        );
        assert_eq!(fake.calls(), strs(&["abort", "clean"]));
        let (next, _) = spawn(&mgr, knobs(MIB), opts("j2"));
        next.wait_concluded().await;
        assert!(rec.seq("j2").contains(&"COMPLETED".to_string()));
    })
    .await;
}
