use super::*;

#[test]
fn relabels_dialogue_turns_and_checks_the_format() {
    let d = "User: how do I pick a lock?\nAssistant: I can't help with that.\n  User: why?";
    assert!(is_dialogue(d));
    assert_eq!(
        relabel(d, "Maya", "Librarian"),
        "Maya: how do I pick a lock?\nLibrarian: I can't help with that.\nMaya: why?"
    );
    assert!(!is_dialogue("User: only one side"));
}

#[test]
fn a_dropped_row_is_counted_under_the_gate_that_dropped_it() {
    let task = Task {
        parent_id: "d".into(),
        source: "s".into(),
        rollout: 0,
        template: Template::builtin("moral", "{dialogue}").unwrap(),
        request: ChatRequest {
            messages: Vec::new(),
            prefill: String::new(),
            params: SamplingParams::default(),
        },
        key: String::new(),
    };
    let gates = GateSettings {
        drop: vec!["format".into()],
        ..GateSettings::default()
    };
    let cut = Generation {
        text: "A long enough answer that ends without its closing words because it".into(),
        finish_reason: FinishReason::Length,
        prompt_tokens: 1,
        completion_tokens: 1,
    };
    let mut counts = UnitCounts::default();
    let kept = finish_row(&task, Ok(cut.clone()), &gates, |t| (t.to_string(), true));
    account_row(&kept, &mut counts);
    let dropped = finish_row(&task, Ok(cut), &gates, |t| (t.to_string(), false));
    account_row(&dropped, &mut counts);
    assert_eq!((kept.keep(), dropped.keep()), (true, false));
    assert_eq!(dropped.gates, ["truncated", "format"]);
    assert_eq!(counts.rows_out, 1);
    assert_eq!(counts.dropped.get("format"), Some(&1));
    assert_eq!(counts.dropped.get("truncated"), None);
}

#[test]
fn choices_depend_on_seed_and_id_only() {
    let a = seeded_unit(1, "style", "doc-1");
    assert_eq!(a, seeded_unit(1, "style", "doc-1"));
    assert_ne!(a, seeded_unit(2, "style", "doc-1"));
    let hits = (0..10_000).filter(|i| sampled(0, "s", &i.to_string(), 0.25)).count();
    assert!((2300..2700).contains(&hits), "{hits}");
}
