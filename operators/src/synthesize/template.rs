//! Prompt templates: one TOML file each (`operators/templates/`, built into the binary, or a
//! user's file by path), with an id, a version, the output kind and style, the system and user
//! messages and an optional prefill. The placeholder `{document}` (or `{dialogue}`) is replaced
//! by the input text; nothing else in a template is interpreted.

use safepipe_model::llm::chat::defuse_control_markers;
use safepipe_model::llm::{ChatRequest, Message, SamplingParams};
use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    pub id: String,
    pub version: u32,
    /// `safeweb`, `refuseweb`, `moral` or `annotation`.
    pub kind: String,
    pub style: String,
    pub system: String,
    pub user: String,
    #[serde(default)]
    pub prefill: String,
    #[serde(default)]
    pub stop: Vec<String>,
    /// SHA-256 of the file text (first 12 hex digits): an edit without a version bump still
    /// changes cache keys and fingerprints.
    #[serde(skip_deserializing)]
    pub hash: String,
}

/// The templates shipped with safepipe, by file name.
pub const BUILTIN: [(&str, &str); 10] = [
    (
        "rephrase-podcast",
        include_str!("../../templates/rephrase-podcast.toml"),
    ),
    (
        "rephrase-textbook",
        include_str!("../../templates/rephrase-textbook.toml"),
    ),
    (
        "rephrase-teacher",
        include_str!("../../templates/rephrase-teacher.toml"),
    ),
    ("rephrase-talk", include_str!("../../templates/rephrase-talk.toml")),
    (
        "rephrase-parent-child",
        include_str!("../../templates/rephrase-parent-child.toml"),
    ),
    (
        "rephrase-friends",
        include_str!("../../templates/rephrase-friends.toml"),
    ),
    (
        "rephrase-kids-video",
        include_str!("../../templates/rephrase-kids-video.toml"),
    ),
    ("refuse", include_str!("../../templates/refuse.toml")),
    ("moral", include_str!("../../templates/moral.toml")),
    ("annotate", include_str!("../../templates/annotate.toml")),
];

/// The SafeWeb styles shipped with safepipe (the paper's seven).
pub const REPHRASE_STYLES: [&str; 7] = [
    "rephrase-podcast",
    "rephrase-textbook",
    "rephrase-teacher",
    "rephrase-talk",
    "rephrase-parent-child",
    "rephrase-friends",
    "rephrase-kids-video",
];

impl Template {
    /// Parses a template file's text; `placeholder` must occur in the user message.
    pub fn parse(origin: &str, text: &str, placeholder: &str) -> Result<Template, String> {
        let mut t: Template = toml::from_str(text).map_err(|e| format!("template {origin}: {e}"))?;
        if !t.user.contains(placeholder) {
            return Err(format!(
                "template {origin}: the user message has no {placeholder} placeholder"
            ));
        }
        t.hash = hex::encode(Sha256::digest(text.as_bytes()))[..12].to_string();
        Ok(t)
    }

    /// A built-in template by name.
    pub fn builtin(name: &str, placeholder: &str) -> Result<Template, String> {
        let (_, text) = BUILTIN
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| format!("no built-in template {name:?}"))?;
        Template::parse(&format!("built-in {name}"), text, placeholder)
    }

    /// `id@version#hash`: what `synthetic.template` records and cache keys use.
    pub fn identity(&self) -> String {
        format!("{}@{}#{}", self.id, self.version, self.hash)
    }

    /// The chat request for one input: the input (control markers defused, cut to
    /// `max_chars` characters) in place of the placeholder.
    pub fn request(&self, placeholder: &str, input: &str, max_chars: usize, params: SamplingParams) -> ChatRequest {
        let cut: String = input.chars().take(max_chars).collect();
        let user = self.user.replace(placeholder, &defuse_control_markers(&cut));
        let mut messages = Vec::with_capacity(2);
        if !self.system.is_empty() {
            messages.push(Message::new("system", self.system.clone()));
        }
        messages.push(Message::new("user", user));
        let mut params = params;
        params.stop.extend(self.stop.iter().cloned());
        ChatRequest {
            messages,
            prefill: self.prefill.clone(),
            params,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_parse_and_render() {
        for (name, _) in BUILTIN {
            let placeholder = if name == "moral" { "{dialogue}" } else { "{document}" };
            let t = Template::builtin(name, placeholder).unwrap();
            assert_eq!(t.id, name);
            let r = t.request(placeholder, "text <|im_end|> more", 12, SamplingParams::default());
            let user = &r.messages.last().unwrap().content;
            assert!(user.contains("text <\u{2060}|im") && !user.contains("more"), "{user}");
        }
        assert!(
            Template::parse(
                "x",
                "id='a'\nversion=1\nkind='k'\nstyle='s'\nsystem=''\nuser='no slot'",
                "{document}"
            )
            .is_err()
        );
    }

    /// The RefuseWeb prompt names every harm category of the paper's prompt (its section 3).
    #[test]
    fn the_refusal_prompt_names_the_papers_harm_categories() {
        let t = Template::builtin("refuse", "{document}").unwrap();
        for category in [
            "harassment",
            "discrimination",
            "hacking",
            "physical harm",
            "economic harm",
            "fraud",
            "disinformation",
            "adult content",
            "private data",
        ] {
            assert!(t.user.contains(category), "{category} missing: {}", t.user);
        }
    }
}
