//! The kiosk shell on the committed tiny model, without a gateway: what it does when the
//! record store cannot be written and how it reports sessions.
#![allow(clippy::unwrap_used)] // A test that unwraps fails loudly, which is what it is for.

mod common;

use std::time::Duration;

use diffusionx_kiosk::records::RecordStore;
use diffusionx_kiosk::runner::Kiosk;
use diffusionx_kiosk::script;
use diffusionx_ui::{FinalPath, Screen};

/// A kiosk with no gateway (every picture refined locally) keeping its records in `records`.
fn kiosk(records: RecordStore) -> Kiosk {
    common::kiosk(records, None)
}

async fn play(kiosk: &mut Kiosk, script: &str) {
    let steps = script::parse(script).unwrap();
    kiosk.play(&steps, Duration::from_secs(600)).await.unwrap();
}

const ONE_PICTURE: &str = "type a red fox\nkey done\nwait preview\npress finalize\nwait final\n";

#[tokio::test(flavor = "current_thread")]
async fn a_record_store_that_cannot_be_written_does_not_stop_the_visitors_picture() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("records");
    let store = RecordStore::open(&folder).unwrap();
    let mut kiosk = kiosk(store.clone());
    // The folder is gone and a file stands in its way (a broken or full card: root writes
    // into read-only folders, so a file in the way is what fails for everyone).
    std::fs::remove_dir(&folder).unwrap();
    std::fs::write(&folder, b"not a folder").unwrap();

    play(&mut kiosk, &format!("press start\n{ONE_PICTURE}")).await;
    assert!(matches!(
        kiosk.session().screen(),
        Screen::Final {
            path: FinalPath::Local,
            ..
        }
    ));
    assert_eq!(
        kiosk.record_failures(),
        2,
        "the record when the preview started and at finalize"
    );
    // The report of the finished session cannot be written either: it waits in memory.
    play(&mut kiosk, "press newpicture\nwait prompt\n").await;
    assert_eq!(kiosk.record_failures(), 3);
    assert_eq!(kiosk.unsent_reports().len(), 1);

    // The card is back: the next write takes the waiting report first.
    std::fs::remove_file(&folder).unwrap();
    std::fs::create_dir(&folder).unwrap();
    play(&mut kiosk, ONE_PICTURE).await;
    assert!(kiosk.unsent_reports().is_empty());
    assert_eq!(kiosk.record_failures(), 3);
    let reports = store.reports().unwrap();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0]["session"], 1);
    assert_eq!(reports[0]["ending"], "finished");
    assert_eq!(reports[0]["path"], "local");
    // No gateway: refined locally by design, not as a fallback from an unreachable cloud.
    assert_eq!(reports[0]["fallback_reason"], "local-only");
}

#[tokio::test(flavor = "current_thread")]
async fn a_session_left_open_by_the_last_run_is_reported_as_abandoned_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let store = RecordStore::open(dir.path()).unwrap();
    // The last run had finalized session 4 when the power went.
    let mut record = diffusionx_kiosk::records::from_json(&serde_json::json!({
        "session": 4, "rounds": [{"prompt": "a red fox", "seed": 9, "steps": 4,
        "preview_ms": 1200}], "noise_level": 0.5, "path": null, "ending": "open"
    }))
    .unwrap();
    store.save(&record).unwrap();
    let kiosk = kiosk(store.clone());
    let reports = store.reports().unwrap();
    record.ending = diffusionx_kiosk::session::Ending::Abandoned;
    assert_eq!(
        reports
            .iter()
            .map(diffusionx_kiosk::records::from_json)
            .collect::<Vec<_>>(),
        [Some(record)]
    );
    assert_eq!(store.leftover().unwrap(), None, "current.json is gone");
    assert_eq!(kiosk.record_failures(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn stopping_mid_session_reports_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let store = RecordStore::open(dir.path()).unwrap();
    let mut kiosk = kiosk(store.clone());
    play(
        &mut kiosk,
        "press start\ntype a red fox\nkey done\nwait preview\n",
    )
    .await;
    // SIGTERM (main.rs) or an operator's restart.
    kiosk.interrupt().unwrap();
    assert!(matches!(kiosk.session().screen(), Screen::Attract { .. }));
    let reports = store.reports().unwrap();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0]["session"], 1);
    assert_eq!(reports[0]["ending"], "abandoned");
    assert_eq!(reports[0]["rounds"][0]["prompt"], "a red fox");
    // Once only: stopping again reports nothing more.
    kiosk.interrupt().unwrap();
    assert_eq!(store.reports().unwrap().len(), 1);
}

/// A session cut off (power loss, `kill -9`) before the visitor finalized is on disk from its
/// first round and reported as abandoned at the next start, with the rounds it had.
#[tokio::test(flavor = "current_thread")]
async fn a_session_killed_before_finalize_is_reported_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let store = RecordStore::open(dir.path()).unwrap();
    let mut kiosk = kiosk(store.clone());
    play(
        &mut kiosk,
        "press start\ntype a red fox\nkey done\nwait preview\n",
    )
    .await;
    // No interrupt: the process is gone without a word.
    drop(kiosk);
    assert_eq!(store.reports().unwrap().len(), 0);

    let _restarted = self::kiosk(store.clone());
    let reports = store.reports().unwrap();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0]["ending"], "abandoned");
    assert_eq!(reports[0]["rounds"][0]["prompt"], "a red fox");
    assert_eq!(reports[0]["rounds"].as_array().map(Vec::len), Some(1));
    assert_eq!(store.leftover().unwrap(), None, "reported once");
}

/// The kiosk counts a prompt with the model's own tokenizer: a prompt the model would read
/// only in part is refused with a notice before any preview starts.
#[tokio::test(flavor = "current_thread")]
async fn a_prompt_longer_than_the_model_reads_is_refused_before_the_preview() {
    let dir = tempfile::tempdir().unwrap();
    let mut kiosk = kiosk(RecordStore::open(dir.path()).unwrap());
    let long = "a red fox in the snow ".repeat(16);
    play(&mut kiosk, &format!("press start\ntype {long}\nkey done\n")).await;
    match kiosk.session().screen() {
        Screen::PromptEntry { notice, .. } => {
            assert_eq!(
                notice.as_deref(),
                Some(diffusionx_kiosk::session::LONG_NOTICE)
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(kiosk.session().record().rounds.is_empty(), "no preview ran");
}
