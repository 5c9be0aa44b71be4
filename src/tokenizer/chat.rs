//! Chat messages to a prompt with the model's own Jinja chat template (from its GGUF metadata).
use minijinja::{Environment, context};

pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // Templates signal bad conversations (e.g. roles out of order) this way, as in transformers.
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string()).map_err(|e| format!("chat template does not parse: {e}"))?;
        Ok(Self { env, bos: bos.into(), eos: eos.into() })
    }

    /// The prompt for `messages` (role, content), ready for the assistant's turn.
    pub fn render(&self, messages: &[(String, String)]) -> Result<String, String> {
        let messages: Vec<_> =
            messages.iter().map(|(role, content)| context! { role => role, content => content }).collect();
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos,
                eos_token => self.eos,
            })
            .map_err(|e| format!("chat template failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_chatml_template_with_generation_prompt() {
        let t = ChatTemplate::new(
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n{% endfor %}\
             {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            "",
            "<|im_end|>",
        )
        .unwrap();
        let out = t.render(&[("user".into(), " hi ".into())]).unwrap();
        assert_eq!(out, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn raise_exception_becomes_an_error() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "").unwrap();
        assert!(t.render(&[]).unwrap_err().contains("roles must alternate"));
    }
}
