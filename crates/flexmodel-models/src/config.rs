//! Reading `config.json` as transformers 4.x and 5.x write it.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{Error, Result};

/// A parsed `config.json`, kept as JSON so each family reads the fields it knows.
pub(crate) struct RawConfig {
    pub(crate) path: PathBuf,
    pub(crate) json: Value,
}

impl RawConfig {
    pub(crate) fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let json = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.clone(),
            message: format!("invalid JSON: {e}"),
        })?;
        Ok(Self { path, json })
    }

    /// The `model_type` field.
    pub(crate) fn model_type(&self) -> Result<&str> {
        self.json
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| self.error("no `model_type` field"))
    }

    /// The config as a family's typed `Config`.
    pub(crate) fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(self.json.clone()).map_err(|e| self.error(e.to_string()))
    }

    /// Number of decoder layers (`num_hidden_layers`, GPT-2's `n_layer`).
    pub(crate) fn num_layers(&self) -> Result<usize> {
        ["num_hidden_layers", "n_layer"]
            .iter()
            .find_map(|k| self.get(k).and_then(Value::as_u64))
            .map(|n| n as usize)
            .ok_or_else(|| self.error("no `num_hidden_layers` field"))
    }

    /// A top-level field.
    pub(crate) fn get(&self, key: &str) -> Option<&Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    /// A number field: `default` when absent, `None` when null.
    pub(crate) fn f64_or(&self, key: &str, default: Option<f64>) -> Result<Option<f64>> {
        match self.json.get(key) {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.error(format!("`{key}` must be a number, not {v}"))),
        }
    }

    /// Fails unless the boolean option `key` is absent, null or false.
    pub(crate) fn require_false(&self, key: &str) -> Result<()> {
        match self.get(key) {
            None | Some(Value::Bool(false)) => Ok(()),
            Some(v) => Err(Error::unsupported(
                key,
                v.to_string(),
                "flexmodel runs causal (left-to-right) attention only; set it to false",
            )),
        }
    }

    /// Fails on options of related architectures that change the model and that this
    /// family does not implement (`own`: the ones it does), so such a config cannot load as
    /// a silently different model.
    pub(crate) fn reject_foreign_options(&self, own: &[&str]) -> Result<()> {
        const FOREIGN: &[&str] = &[
            "attn_logit_softcapping",
            "final_logit_softcapping",
            "query_pre_attn_scalar",
            "logits_scaling",
            "residual_multiplier",
            "embedding_multiplier",
            "attention_multiplier",
            "use_qk_norm",
            "qk_layernorm_per_head",
        ];
        let foreign = FOREIGN
            .iter()
            .find(|k| !own.contains(k) && self.get(k).is_some());
        match foreign {
            Some(key) => Err(Error::unsupported(
                *key,
                self.json[*key].to_string(),
                format!(
                    "`{}` models do not use this option; the checkpoint is probably of another architecture",
                    self.model_type()?
                ),
            )),
            None => Ok(()),
        }
    }

    pub(crate) fn error(&self, message: impl Into<String>) -> Error {
        Error::Config {
            path: self.path.clone(),
            message: message.into(),
        }
    }
}

/// Rejects a config option unless it has its harmless value.
pub(crate) fn require<T: PartialEq + std::fmt::Debug>(
    option: &str,
    value: T,
    supported: T,
    hint: &str,
) -> Result<()> {
    if value == supported {
        Ok(())
    } else {
        Err(Error::unsupported(option, format!("{value:?}"), hint))
    }
}
