//! The tolerant parser of the annotator's 0..5 rubric answers. The prompt prefills
//! `{"score": `, so the model usually continues with a digit; answers may also repeat the whole
//! object, wrap it in a code fence, add text after it, or be a bare digit. Anything else is
//! "unparseable": recorded, never guessed.

/// `(score, reason)` from the prefill + the model's continuation.
pub fn parse(prefill: &str, answer: &str) -> Result<(u8, Option<String>), String> {
    let joined = format!("{prefill}{answer}");
    for candidate in [joined.as_str(), answer] {
        if let Some(found) = json_object(candidate) {
            return Ok(found);
        }
    }
    // The continuation of `{"score": ` or a bare answer: a lone digit 0..5 first.
    let trimmed = answer.trim_start().trim_start_matches(['"', '\'']);
    let mut chars = trimmed.chars();
    if let Some(first) = chars.next()
        && let Some(score) = first.to_digit(10)
        && score <= 5
        && !chars.next().is_some_and(|c| c.is_ascii_digit() || c == '.')
    {
        return Ok((score as u8, None));
    }
    Err(format!(
        "unparseable rubric answer: {:?}",
        answer.chars().take(80).collect::<String>()
    ))
}

/// The first `{...}` in `text` (code fences and surrounding text allowed) that parses as JSON
/// with an integer `score` in 0..5.
fn json_object(text: &str) -> Option<(u8, Option<String>)> {
    let mut start = 0;
    while let Some(open) = text[start..].find('{') {
        let from = start + open;
        let mut depth = 0usize;
        let mut in_string = false;
        let mut escaped = false;
        for (i, c) in text[from..].char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if in_string => escaped = true,
                '"' => in_string = !in_string,
                '{' if !in_string => depth += 1,
                '}' if !in_string => {
                    depth -= 1;
                    if depth == 0 {
                        let value: serde_json::Value = serde_json::from_str(&text[from..=from + i]).ok()?;
                        // Integers, integer-valued numbers (`2.0`) and digit strings; never rounding.
                        let score = match &value["score"] {
                            serde_json::Value::Number(n) => n
                                .as_u64()
                                .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0).map(|f| f as u64)),
                            serde_json::Value::String(s) => s.trim().parse().ok(),
                            _ => None,
                        }?;
                        if score > 5 {
                            return None;
                        }
                        let reason = value["reason"].as_str().map(str::to_string);
                        return Some((score as u8, reason));
                    }
                }
                _ => {}
            }
        }
        start = from + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFILL: &str = "{\"score\": ";

    #[test]
    fn accepts_the_usual_shapes_and_refuses_to_guess() {
        assert_eq!(
            parse(PREFILL, "3, \"reason\": \"mild violence\"}").unwrap(),
            (3, Some("mild violence".into()))
        );
        assert_eq!(parse(PREFILL, "0}").unwrap(), (0, None));
        assert_eq!(parse(PREFILL, "4, \"reason\": \"unterminated").unwrap(), (4, None));
        let fenced = "```json\n{\"score\": 5, \"reason\": \"threats\"}\n```\nThat is my answer.";
        assert_eq!(parse("", fenced).unwrap(), (5, Some("threats".into())));
        assert_eq!(parse(PREFILL, "\"2\"}").unwrap().0, 2);
        assert_eq!(parse("", " 1").unwrap(), (1, None));
        assert!(parse(PREFILL, "7}").is_err());
        assert!(parse(PREFILL, "12}").is_err());
        assert!(parse(PREFILL, "I cannot rate this.").is_err());
        assert!(parse(PREFILL, "2.5}").is_err());
        assert_eq!(parse(PREFILL, "0.0, \"reason\": \"none\"}").unwrap().0, 0);
    }
}
