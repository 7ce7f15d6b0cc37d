use super::*;
use crate::stages::{OutputTable, Stage, StageBatch, Upstream};
use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use futures::stream::BoxStream;

/// A stage that panics on unit 1 and writes one row for every other unit.
struct Boom;

fn schema() -> arrow::datatypes::SchemaRef {
    Arc::new(Schema::new(vec![Field::new("id", DataType::Utf8, false)]))
}

impl Stage for Boom {
    fn name(&self) -> &'static str {
        "boom"
    }
    fn reads(&self) -> &'static [Upstream] {
        &[]
    }
    fn outputs(&self) -> Vec<OutputTable> {
        vec![OutputTable {
            name: "rows",
            schema: schema(),
        }]
    }
    fn settings(&self) -> Result<serde_json::Value> {
        Ok(serde_json::json!({}))
    }
}

impl UnitStage for Boom {
    fn run(&self, input: UnitInput) -> BoxStream<'static, Result<StageBatch>> {
        let id = input.unit.id;
        futures::stream::once(async move {
            assert_ne!(id, 1, "unit 1 explodes on purpose");
            let rows = RecordBatch::try_new(schema(), vec![Arc::new(StringArray::from(vec![format!("u{id}")]))])?;
            Ok(StageBatch {
                tables: vec![("rows", rows)],
                counts: UnitCounts {
                    rows_in: 1,
                    rows_out: 1,
                    ..Default::default()
                },
            })
        })
        .boxed()
    }
}

struct Quiet;
impl Reporter for Quiet {}

/// Regression (review of issue 16): past unit 999,999 names have seven digits; reading six
/// made a redo of unit 100000 delete units 1000000..=1000009's files.
#[test]
fn files_are_indexed_by_their_whole_unit_number() {
    let mut files = crate::engine::run_dir::StageFiles::default();
    for name in [
        "s/t/unit-100000-f-a.parquet",
        "s/t/unit-1000003-f-b.parquet",
        "s/_done/unit-000001.json",
        "other/t/unit-000001-f-c.parquet",
    ] {
        let meta = object_store::ObjectMeta {
            location: object_store::path::Path::from(name),
            last_modified: chrono::Utc::now(),
            size: 1,
            e_tag: None,
            version: None,
        };
        files.files.insert(name.to_string(), meta);
    }
    let by_unit = files_by_unit("s", &files);
    assert_eq!(by_unit[&100000], vec!["s/t/unit-100000-f-a.parquet".to_string()]);
    assert_eq!(by_unit[&1000003], vec!["s/t/unit-1000003-f-b.parquet".to_string()]);
    assert_eq!(by_unit.len(), 2);
}

#[tokio::test]
async fn a_panicking_unit_fails_alone_with_its_message_and_frees_its_lease() {
    let tmp = tempfile::tempdir().unwrap();
    let env = Arc::new(Env {
        run_dir: RunDir::open(tmp.path().to_str().unwrap()).unwrap(),
        rank: 0,
        world_size: 1,
        lease_time: Duration::from_secs(60),
        reporter: Arc::new(Quiet),
    });
    let stage: Arc<dyn UnitStage> = Arc::new(Boom);
    let mut outcomes = BTreeMap::new();
    for id in 0..3 {
        let job = UnitJob {
            unit: WorkUnit {
                id,
                input: "x".into(),
                file: "/nowhere".into(),
                size: 0,
                slice: safepipe_operators::ingest::Slice::Unreadable { error: String::new() },
            },
            why: Why::New,
            fingerprint: Fingerprint {
                settings: String::new(),
                stage: String::new(),
            },
            upstream: BTreeMap::new(),
            inputs: BTreeMap::new(),
            leftovers: Vec::new(),
        };
        let (unit, _, outcome) = attempt(stage.clone(), job, env.clone()).await;
        outcomes.insert(unit, outcome);
    }
    assert!(matches!(outcomes[&0], Outcome::Committed(_)));
    assert!(matches!(outcomes[&2], Outcome::Committed(_)));
    match &outcomes[&1] {
        Outcome::Failed(e) => assert!(e.contains("panicked") && e.contains("explodes on purpose"), "{e}"),
        _ => panic!("unit 1 must fail"),
    }
    let files = env.run_dir.stage("boom").await.unwrap();
    assert_eq!(files.done.len(), 2);
    assert!(files.failed[&1].error.contains("explodes on purpose"));
    assert!(
        !files.files.keys().any(|f| f.contains("/_attempts/")),
        "no attempt file is left: {:?}",
        files.files.keys().collect::<Vec<_>>()
    );
    // Every lease is released (a tombstone with expiry 0), the panicked unit's too.
    let leases = env.run_dir.list("boom/_leases").await.unwrap();
    assert_eq!(leases.len(), 3, "one lease per unit: {leases:?}");
    for lease in leases {
        let bytes = env
            .run_dir
            .root()
            .with_path(lease.location.clone())
            .read()
            .await
            .unwrap()
            .unwrap();
        let holder: leases::Holder = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(holder.expires_at, 0, "{} is still held", lease.location);
    }
    let recent = Duration::from_secs(3600);
    assert!(
        leases::held(&env.run_dir, "boom", None, recent)
            .await
            .unwrap()
            .is_empty()
    );
    // The table folder holds exactly the committed files.
    let tables: Vec<_> = files.files.keys().filter(|f| f.starts_with("boom/rows/")).collect();
    assert_eq!(tables.len(), 2, "{tables:?}");
}
