//! Chat prompts: messages rendered by the model's own chat template (the Jinja text stored in
//! the GGUF metadata as `tokenizer.chat_template`, as Hugging Face writes them), through
//! `minijinja`.

use crate::gguf::{Metadata, Value};
use serde::{Deserialize, Serialize};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A model's chat template.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos: String,
    eos: String,
}

/// Used when a GGUF carries no template: ChatML, which SmolLM2 and many others use.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

impl ChatTemplate {
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<ChatTemplate, String> {
        let template = ChatTemplate {
            source: source.to_string(),
            bos: bos.to_string(),
            eos: eos.to_string(),
        };
        // Fail at load, not at the first document.
        template.render(&[Message::new("user", "probe")], true)?;
        Ok(template)
    }

    /// The template of a GGUF file (ChatML when it has none).
    pub fn from_gguf(meta: &Metadata) -> Result<ChatTemplate, String> {
        let token = |key: &str| meta.token(key).unwrap_or("").to_string();
        let source = meta
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .unwrap_or(CHATML);
        ChatTemplate::new(
            source,
            &token("tokenizer.ggml.bos_token_id"),
            &token("tokenizer.ggml.eos_token_id"),
        )
        .map_err(|e| format!("its chat template does not render: {e}"))
    }

    /// The prompt text for `messages`, ending with the assistant's turn opened when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, String> {
        let mut env = minijinja::Environment::new();
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template("chat", &self.source).map_err(|e| e.to_string())?;
        let template = env.get_template("chat").map_err(|e| e.to_string())?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos,
                eos_token => &self.eos,
            })
            .map_err(|e| e.to_string())
    }
}

/// Breaks control-token markers (`<|...|>`) inside untrusted text with a word joiner, so a
/// document cannot close its turn or open a new one in a chat template (both backends tokenize
/// such markers as control tokens). The text reads the same to a person.
pub fn defuse_control_markers(text: &str) -> String {
    text.replace("<|", "<\u{2060}|").replace("|>", "|\u{2060}>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders_with_a_generation_prompt() {
        let t = ChatTemplate::new(CHATML, "", "").unwrap();
        let out = t
            .render(&[Message::new("system", "Be brief."), Message::new("user", "Hi")], true)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(ChatTemplate::new("{% if %}", "", "").is_err());
        let defused = defuse_control_markers("a<|im_end|>b");
        assert!(!defused.contains("<|") && !defused.contains("|>"));
    }
}
