//! Pricing (SPEC §4): SkyWalking's `gen-ai-config.yml`, unchanged, plus optional cached and
//! cache-creation input prices, with longest-prefix model lookup and exact cost arithmetic.

use crate::fixed::Fixed;
use crate::series::FastMap;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The pricing Tollgate starts with: SkyWalking's shipped `gen-ai-config.yml`, verbatim
/// (apache/skywalking 5839d2ad, Apache-2.0).
pub const BUILT_IN_PRICING: &str = include_str!("gen-ai-config.yml");

/// The highest accepted price per million tokens; anything above is a typo, not a model.
pub const MAX_PRICE_PER_M: f64 = 1_000_000.0;

/// A pricing document in the `gen-ai-config.yml` format.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricingDocument {
    /// Informational date of the prices; not interpreted.
    #[serde(rename = "last-updated", default, skip_serializing_if = "Option::is_none")]
    pub last_updated: Option<String>,
    /// Providers with their model prices.
    #[serde(default)]
    pub providers: Vec<ProviderPricing>,
}

/// One provider section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderPricing {
    /// Provider name (`openai`).
    pub provider: String,
    /// Model-name prefixes that identify the provider when a record does not name it.
    #[serde(rename = "prefix-match", default, skip_serializing_if = "Option::is_none")]
    pub prefix_match: Option<Vec<String>>,
    /// Priced models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<ModelPricing>>,
}

/// Prices of one model, per million tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPricing {
    /// Model name, matched as a prefix of the reported model.
    pub name: String,
    /// Other names matched the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aliases: Option<Vec<String>>,
    /// Price of a million input tokens (missing means 0, as in SkyWalking).
    #[serde(rename = "input-estimated-cost-per-m", default, skip_serializing_if = "Option::is_none")]
    pub input: Option<f64>,
    /// Price of a million output tokens (missing means 0, as in SkyWalking).
    #[serde(rename = "output-estimated-cost-per-m", default, skip_serializing_if = "Option::is_none")]
    pub output: Option<f64>,
    /// Price of a million cached (cache-read) input tokens; missing means the input price.
    #[serde(rename = "cached-input-estimated-cost-per-m", default, skip_serializing_if = "Option::is_none")]
    pub cached_input: Option<f64>,
    /// Price of a million cache-creation input tokens; missing means the input price.
    #[serde(rename = "cache-creation-input-estimated-cost-per-m", default, skip_serializing_if = "Option::is_none")]
    pub cache_creation_input: Option<f64>,
}

/// Why a pricing document was refused; the message names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid pricing: {0}")]
pub struct PricingError(pub String);

impl PricingDocument {
    /// Parses YAML (JSON is YAML too) and validates it.
    pub fn parse(text: &str) -> Result<PricingDocument, PricingError> {
        let document: PricingDocument = crate::config::parse_yaml(text).map_err(PricingError)?;
        document.validate()?;
        document.check_new()?;
        Ok(document)
    }

    /// Checks only new documents get (committed ones are replayed through
    /// [`PricingDocument::validate`] alone, so they never fail a check added later): model names,
    /// aliases and prefixes are matched as written, so one that is blank or has spaces around it
    /// (`" "`, `"gpt-4o "`) is a typo that never matches the model meant.
    pub fn check_new(&self) -> Result<(), PricingError> {
        // The path is written only for the name refused.
        let check = |name: &str, at: &dyn Fn() -> String| {
            if name.trim() == name {
                return Ok(());
            }
            Err(PricingError(format!("{}: {name:?} has spaces around it; names are matched as written", at())))
        };
        for (p, provider) in self.providers.iter().enumerate() {
            check(&provider.provider, &|| format!("providers[{p}].provider"))?;
            for (i, prefix) in provider.prefix_match.iter().flatten().enumerate() {
                check(prefix, &|| format!("providers[{p}].prefix-match[{i}]"))?;
            }
            for (m, model) in provider.models.iter().flatten().enumerate() {
                check(&model.name, &|| format!("providers[{p}].models[{m}].name"))?;
                for (i, alias) in model.aliases.iter().flatten().enumerate() {
                    check(alias, &|| format!("providers[{p}].models[{m}].aliases[{i}]"))?;
                }
            }
        }
        Ok(())
    }

    /// Checks every field; the first problem is reported with its path.
    pub fn validate(&self) -> Result<(), PricingError> {
        for (p, provider) in self.providers.iter().enumerate() {
            let at = format!("providers[{p}]");
            if provider.provider.trim().is_empty() {
                return Err(PricingError(format!("{at}.provider: must be a non-empty name")));
            }
            for (i, prefix) in provider.prefix_match.iter().flatten().enumerate() {
                if prefix.is_empty() {
                    return Err(PricingError(format!("{at}.prefix-match[{i}]: must not be empty")));
                }
            }
            for (m, model) in provider.models.iter().flatten().enumerate() {
                let at = format!("{at}.models[{m}]");
                if model.name.is_empty() {
                    return Err(PricingError(format!("{at}.name: must not be empty")));
                }
                for (i, alias) in model.aliases.iter().flatten().enumerate() {
                    if alias.is_empty() {
                        return Err(PricingError(format!("{at}.aliases[{i}]: must not be empty")));
                    }
                }
                for (field, price) in [
                    ("input-estimated-cost-per-m", model.input),
                    ("output-estimated-cost-per-m", model.output),
                    ("cached-input-estimated-cost-per-m", model.cached_input),
                    ("cache-creation-input-estimated-cost-per-m", model.cache_creation_input),
                ] {
                    let Some(price) = price else { continue };
                    if !price.is_finite() || !(0.0..=MAX_PRICE_PER_M).contains(&price) {
                        // `{}` writes 1e308 with all its 309 digits; the exponent form is what
                        // the user most likely typed.
                        let shown = if price.abs() >= 1e15 { format!("{price:e}") } else { price.to_string() };
                        return Err(PricingError(format!(
                            "{at}.{field}: {shown} is not a price between 0 and {MAX_PRICE_PER_M} per million tokens (model {:?})",
                            model.name
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Prices of one model in fixed point, per million tokens, so that `tokens × price` is the cost
/// in micro-units (SPEC §4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelPrice {
    /// The name or alias that matched.
    pub key: String,
    /// The model entry's name.
    pub model: String,
    /// The provider section it is listed under.
    pub provider: String,
    /// Input price.
    pub input: Fixed,
    /// Output price.
    pub output: Fixed,
    /// Cached input price; `None` means the input price.
    pub cached_input: Option<Fixed>,
    /// Cache-creation input price; `None` means the input price.
    pub cache_creation_input: Option<Fixed>,
}

/// The token types of `gen_ai.token.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenType {
    /// Input tokens, including cached and cache-creation tokens.
    Input,
    /// Output tokens, including reasoning tokens.
    Output,
    /// Input tokens read from a prompt cache.
    CachedInput,
    /// Input tokens written to a prompt cache.
    CacheCreationInput,
    /// Reasoning tokens (already part of output).
    Reasoning,
}

impl TokenType {
    /// The type named by a `gen_ai.token.type` value.
    pub fn parse(value: &str) -> Option<TokenType> {
        match value {
            "input" => Some(TokenType::Input),
            "output" => Some(TokenType::Output),
            "cached_input" => Some(TokenType::CachedInput),
            "cache_creation_input" => Some(TokenType::CacheCreationInput),
            "reasoning" => Some(TokenType::Reasoning),
            _ => None,
        }
    }
}

impl ModelPrice {
    /// The amount one token of `token_type` adds to a cost total, per million tokens.
    ///
    /// `input` already includes cached and cache-creation tokens and `output` already includes
    /// reasoning tokens, so those add only the difference to the input price (or nothing).
    pub fn price_per_m(&self, token_type: TokenType) -> Fixed {
        match token_type {
            TokenType::Input => self.input,
            TokenType::Output => self.output,
            TokenType::CachedInput => self.cached_input.unwrap_or(self.input) - self.input,
            TokenType::CacheCreationInput => self.cache_creation_input.unwrap_or(self.input) - self.input,
            TokenType::Reasoning => Fixed::ZERO,
        }
    }

    /// Cost of one request in micro-units.
    pub fn request_cost(&self, tokens: &RequestTokens) -> Fixed {
        let mut cost = Fixed::ZERO;
        for (token_type, count) in [
            (TokenType::Input, tokens.input),
            (TokenType::Output, tokens.output),
            (TokenType::CachedInput, tokens.cached_input),
            (TokenType::CacheCreationInput, tokens.cache_creation_input),
        ] {
            cost += Fixed::from_int(count as i64).mul_price(self.price_per_m(token_type));
        }
        cost
    }
}

/// Token counts of one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestTokens {
    /// Input tokens (including cached and cache-creation ones).
    pub input: u64,
    /// Output tokens.
    pub output: u64,
    /// Cached input tokens.
    pub cached_input: u64,
    /// Cache-creation input tokens.
    pub cache_creation_input: u64,
}

/// A validated pricing document compiled for lookups.
#[derive(Clone, Debug, Default)]
pub struct PriceTable {
    version: u64,
    document: PricingDocument,
    models: FastMap<String, ModelPrice>,
    /// The distinct lengths of the model names and aliases, longest first.
    model_key_lengths: Vec<usize>,
    providers: FastMap<String, String>,
    /// The distinct lengths of the provider prefixes, longest first.
    provider_prefix_lengths: Vec<usize>,
}

impl PriceTable {
    /// Compiles a document (validating it first).
    pub fn new(document: PricingDocument) -> Result<PriceTable, PricingError> {
        document.validate()?;
        let mut models = FastMap::default();
        let mut providers = FastMap::default();
        for provider in &document.providers {
            for prefix in provider.prefix_match.iter().flatten() {
                providers.insert(prefix.clone(), provider.provider.clone());
            }
            for model in provider.models.iter().flatten() {
                let price = |value: Option<f64>| value.map(|v| Fixed::from_f64(v).unwrap_or(Fixed::ZERO));
                let entry = ModelPrice {
                    key: String::new(),
                    model: model.name.clone(),
                    provider: provider.provider.clone(),
                    input: price(model.input).unwrap_or(Fixed::ZERO),
                    output: price(model.output).unwrap_or(Fixed::ZERO),
                    cached_input: price(model.cached_input),
                    cache_creation_input: price(model.cache_creation_input),
                };
                // Later entries overwrite earlier ones with the same key, as in SkyWalking.
                for key in std::iter::once(&model.name).chain(model.aliases.iter().flatten()) {
                    models.insert(key.clone(), ModelPrice { key: key.clone(), ..entry.clone() });
                }
            }
        }
        let model_key_lengths = key_lengths(models.keys());
        let provider_prefix_lengths = key_lengths(providers.keys());
        Ok(PriceTable { version: 0, document, models, model_key_lengths, providers, provider_prefix_lengths })
    }

    /// Parses, validates and compiles YAML or JSON.
    pub fn parse(text: &str) -> Result<PriceTable, PricingError> {
        PriceTable::new(PricingDocument::parse(text)?)
    }

    /// The table tagged with the version under which its document was committed; caches of
    /// looked-up prices are keyed by it.
    pub fn with_version(mut self, version: u64) -> PriceTable {
        self.version = version;
        self
    }

    /// The committed version (0 for a table that was never committed).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The document this table was built from.
    pub fn document(&self) -> &PricingDocument {
        &self.document
    }

    /// The price of `model`: the longest model name or alias that is a prefix of it,
    /// case-sensitive (SkyWalking semantics). `None` means unpriced.
    pub fn lookup(&self, model: &str) -> Option<&ModelPrice> {
        longest_prefix(&self.models, &self.model_key_lengths, model)
    }

    /// The provider whose longest `prefix-match` entry is a prefix of `model`.
    pub fn provider_of(&self, model: &str) -> Option<&str> {
        longest_prefix(&self.providers, &self.provider_prefix_lengths, model).map(String::as_str)
    }
}

/// The distinct lengths of `keys`, longest first.
fn key_lengths<'a>(keys: impl Iterator<Item = &'a String>) -> Vec<usize> {
    let mut lengths: Vec<usize> = keys.map(String::len).collect();
    lengths.sort_unstable_by(|a, b| b.cmp(a));
    lengths.dedup();
    lengths
}

/// The value of the longest key of `map` that is a prefix of `name`; `lengths` are the distinct
/// lengths of the keys, longest first, so only prefixes of those lengths are looked up (a
/// request's model is looked up for every access-log record).
fn longest_prefix<'a, V>(map: &'a FastMap<String, V>, lengths: &[usize], name: &str) -> Option<&'a V> {
    lengths
        .iter()
        .filter(|&&end| end > 0 && end <= name.len() && name.is_char_boundary(end))
        .find_map(|&end| map.get(&name[..end]))
}

impl fmt::Display for ModelPrice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): in {} out {} per M", self.model, self.provider, self.input, self.output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"
last-updated: 2026-03-23
providers:
  - provider: openai
    prefix-match: [gpt]
    models:
      - name: gpt-4o
        input-estimated-cost-per-m: 2.5
        output-estimated-cost-per-m: 10.0
        cached-input-estimated-cost-per-m: 1.25
      - name: gpt-4o-mini
        input-estimated-cost-per-m: 0.15
        output-estimated-cost-per-m: 0.6
  - provider: anthropic
    prefix-match:
      - claude
    models:
      - name: claude-4-sonnet
        aliases: [claude-sonnet-4]
        input-estimated-cost-per-m: 3
        output-estimated-cost-per-m: 15
        cached-input-estimated-cost-per-m: 0.3
        cache-creation-input-estimated-cost-per-m: 3.75
  - provider: bytedance
    prefix-match:
      - doubao
  - provider: ollama
    prefix-match:
"#;

    #[test]
    fn test_upstream_gen_ai_config_loads_unchanged() {
        let table = PriceTable::parse(BUILT_IN_PRICING).unwrap();
        assert_eq!(table.document().providers.len(), 12);
        // SkyWalking's own unit-test expectations (SKYWALKING-CASES E, G).
        let f = |v: f64| Fixed::from_f64(v).unwrap();
        let pro = table.lookup("gpt-5.4-pro").unwrap();
        assert_eq!((pro.input, pro.output), (f(30.0), f(180.0)));
        assert_eq!(table.lookup("gpt-4.1-mini").unwrap().key, "gpt-4.1");
        assert_eq!(table.lookup("gpt-4.1-mini-2025-04-14-x").unwrap().key, "gpt-4.1-mini-2025-04-14");
        assert_eq!(table.lookup("gpt-5.4-mini-2026-03-17").unwrap().key, "gpt-5.4-mini");
        assert_eq!(table.lookup("gpt-5.1-codex").unwrap().key, "gpt-5.1");
        assert_eq!(table.lookup("claude-opus-4-20250514").unwrap().model, "claude-4-opus");
        assert_eq!(table.lookup("claude-opus-4-1-20250805").unwrap().model, "claude-4.1-opus");
        assert!(table.lookup("qwen2.5:0.5b").is_none());
        assert_eq!(table.provider_of("qwen2.5:0.5b"), Some("alibaba"));
        assert!(table.lookup("GPT-4o").is_none());
        let cost = |model: &str, input, output| {
            table.lookup(model).map(|p| p.request_cost(&RequestTokens { input, output, ..Default::default() }))
        };
        assert_eq!(cost("gpt-5.4", 1000, 500), Some(Fixed::from_int(10_000)));
        assert_eq!(cost("deepseek-chat", 2000, 1000), Some(Fixed::from_int(980)));
        assert_eq!(cost("gpt-4o-mini", 1, 1), Some(f(0.75)));
        assert_eq!(table.provider_of("deepseek-chat"), Some("deepseek"));
        assert_eq!(table.provider_of("gemini-3.1-pro-preview"), Some("gemini"));
    }

    #[test]
    fn test_lookup_longest_prefix_over_names_and_aliases() {
        let table = PriceTable::parse(DOC).unwrap();
        assert_eq!(table.lookup("gpt-4o-mini-2024-07-18").unwrap().key, "gpt-4o-mini");
        assert_eq!(table.lookup("gpt-4o-2024-08-06").unwrap().key, "gpt-4o");
        let alias = table.lookup("claude-sonnet-4-20250514").unwrap();
        assert_eq!((alias.key.as_str(), alias.model.as_str()), ("claude-sonnet-4", "claude-4-sonnet"));
        assert!(table.lookup("gpt-4").is_none(), "a key longer than the name never matches");
        assert!(table.lookup("GPT-4o").is_none(), "matching is case-sensitive");
        assert!(table.lookup("").is_none());
        assert!(table.lookup("ünïcode-gpt").is_none());
    }

    #[test]
    fn test_provider_of_uses_prefix_match() {
        let table = PriceTable::parse(DOC).unwrap();
        assert_eq!(table.provider_of("doubao-pro"), Some("bytedance"));
        assert_eq!(table.provider_of("claude-x"), Some("anthropic"));
        assert_eq!(table.provider_of("llama3"), None);
    }

    #[test]
    fn test_price_per_token_type_accounts_for_inclusion() {
        let table = PriceTable::parse(DOC).unwrap();
        let sonnet = table.lookup("claude-4-sonnet").unwrap();
        let f = |v: f64| Fixed::from_f64(v).unwrap();
        assert_eq!(sonnet.price_per_m(TokenType::Input), f(3.0));
        assert_eq!(sonnet.price_per_m(TokenType::Output), f(15.0));
        assert_eq!(sonnet.price_per_m(TokenType::CachedInput), f(-2.7));
        assert_eq!(sonnet.price_per_m(TokenType::CacheCreationInput), f(0.75));
        assert_eq!(sonnet.price_per_m(TokenType::Reasoning), Fixed::ZERO);
        let mini = table.lookup("gpt-4o-mini").unwrap();
        assert_eq!(mini.price_per_m(TokenType::CachedInput), Fixed::ZERO, "missing cached price equals input");
    }

    #[test]
    fn test_request_cost_in_micro_units() {
        let table = PriceTable::parse(DOC).unwrap();
        let gpt = table.lookup("gpt-4o").unwrap();
        let tokens = RequestTokens { input: 1000, output: 500, cached_input: 400, cache_creation_input: 0 };
        // 1000·2.5 + 500·10 + 400·(1.25 − 2.5)
        assert_eq!(gpt.request_cost(&tokens), Fixed::from_int(7000));
    }

    #[test]
    fn test_parse_rejects_bad_prices_with_field_path() {
        let negative =
            "providers:\n  - provider: x\n    models:\n      - name: m\n        input-estimated-cost-per-m: -1\n";
        let error = PriceTable::parse(negative).unwrap_err().to_string();
        assert!(error.contains("providers[0].models[0].input-estimated-cost-per-m"), "{error}");
        for value in ["abc", "'abc'", "[1]"] {
            let text = format!(
                "providers:\n  - provider: x\n    models:\n      - name: m\n        output-estimated-cost-per-m: {value}\n"
            );
            let error = PriceTable::parse(&text).unwrap_err().to_string();
            assert!(error.contains("providers[0].models[0].output-estimated-cost-per-m: "), "{value}: {error}");
        }
        // A duplicate key: the path names where it is, with no placeholder for the key.
        let twice = "providers:\n  - provider: x\n    provider: y\n";
        let error = PriceTable::parse(twice).unwrap_err().to_string();
        assert!(error.contains("providers[0]: error: line 3") && !error.contains('?'), "{error}");
        let typo = "providers:\n  - provider: x\n    models:\n      - name: m\n        input-cost-per-m: 1\n";
        let error = PriceTable::parse(typo).unwrap_err().to_string();
        assert!(error.contains("input-cost-per-m"), "{error}");
        let empty_name = "providers:\n  - provider: ''\n";
        let error = PriceTable::parse(empty_name).unwrap_err().to_string();
        assert!(error.contains("providers[0].provider"), "{error}");
        let huge =
            "providers:\n  - provider: x\n    models:\n      - name: m\n        input-estimated-cost-per-m: 1e9\n";
        assert!(PriceTable::parse(huge).unwrap_err().to_string().contains("between 0 and"));
        let enormous =
            "providers:\n  - provider: x\n    models:\n      - name: m\n        input-estimated-cost-per-m: 1e308\n";
        let error = PriceTable::parse(enormous).unwrap_err().to_string();
        assert!(error.contains(": 1e308 is not a price") && error.len() < 200, "{error}");
        let not_a_list = "providers:\n  - provider: x\n    prefix-match: gpt\n";
        assert!(PriceTable::parse(not_a_list).is_err());
        // Errors in the author's words, with the place: not the parser library's advice to the
        // programmer calling it.
        let duplicate = "providers:\n  - provider: x\n    provider: y\n";
        let error = PriceTable::parse(duplicate).unwrap_err().to_string();
        assert!(error.contains("duplicate mapping key") && error.contains("line 3"), "{error}");
        assert!(!error.contains("DuplicateKeyPolicy"), "{error}");
        let two_documents = "providers: []\n---\nproviders: []\n";
        let error = PriceTable::parse(two_documents).unwrap_err().to_string();
        assert!(error.contains("multiple"), "{error}");
        assert!(!error.contains("from_str_multiple"), "{error}");
        // Names are matched as written: blank ones and ones with spaces around them are typos.
        for (text, at) in [
            ("providers:\n  - provider: x\n    models:\n      - name: ' '\n", "providers[0].models[0].name"),
            ("providers:\n  - provider: x\n    models:\n      - name: 'gpt-4o '\n", "providers[0].models[0].name"),
            (
                "providers:\n  - provider: x\n    models:\n      - name: m\n        aliases: [' a']\n",
                "providers[0].models[0].aliases[0]",
            ),
            ("providers:\n  - provider: x\n    prefix-match: ['gpt ']\n", "providers[0].prefix-match[0]"),
            ("providers:\n  - provider: ' x'\n", "providers[0].provider"),
        ] {
            let error = PriceTable::parse(text).unwrap_err().to_string();
            assert!(error.contains(&format!("{at}: ")) && error.contains("spaces around it"), "{text:?}: {error}");
        }
        // A committed document is replayed through `validate` alone, which still takes them.
        let document: PricingDocument =
            crate::config::parse_yaml("providers:\n  - provider: x\n    models:\n      - name: ' '\n").unwrap();
        assert!(document.validate().is_ok());
        // A file whose entries are all commented out is not an empty price list.
        let error = PriceTable::parse("# providers:\n#  - provider: openai\n").unwrap_err().to_string();
        assert!(error.contains("the document is empty"), "{error}");
    }

    /// A document near the API's 4 MiB limit parses: 40 000 models (3.5 MB, 280 000 YAML nodes)
    /// were refused as over the YAML library's default budget of 250 000 nodes.
    #[test]
    fn test_parse_takes_a_pricing_document_of_forty_thousand_models() {
        let models: Vec<String> = (0..40_000)
            .map(|i| format!("{{\"name\":\"model-{i:05}\",\"input-estimated-cost-per-m\":1.5,\"output-estimated-cost-per-m\":6}}"))
            .collect();
        let json = format!("{{\"providers\":[{{\"provider\":\"many\",\"models\":[{}]}}]}}", models.join(","));
        assert!(json.len() > 3_000_000 && json.len() < 4 * 1024 * 1024, "{}", json.len());
        let table = PriceTable::parse(&json).unwrap();
        assert_eq!(table.lookup("model-39999").unwrap().provider, "many");
    }

    #[test]
    fn test_parse_accepts_json() {
        let json =
            r#"{"providers":[{"provider":"openai","models":[{"name":"gpt-4o","input-estimated-cost-per-m":2.5}]}]}"#;
        let table = PriceTable::parse(json).unwrap();
        assert_eq!(table.lookup("gpt-4o").unwrap().output, Fixed::ZERO);
    }

    #[test]
    fn test_later_duplicate_overwrites_earlier() {
        let doc = "providers:\n  - provider: a\n    models:\n      - name: m\n        input-estimated-cost-per-m: 1\n  - provider: b\n    models:\n      - name: m\n        input-estimated-cost-per-m: 2\n";
        let table = PriceTable::parse(doc).unwrap();
        assert_eq!(table.lookup("m").unwrap().provider, "b");
    }

    /// The lookup only tries the lengths of the table's keys: it finds what trying every prefix
    /// of the name, longest first, finds.
    #[test]
    fn test_lookup_matches_trying_every_prefix() {
        let table = PriceTable::parse(DOC).unwrap();
        let every_prefix = |name: &str| {
            (1..=name.len())
                .rev()
                .filter(|end| name.is_char_boundary(*end))
                .find_map(|end| table.models.get(&name[..end]))
                .map(|price| price.key.clone())
        };
        let mut names: Vec<String> = vec![String::new(), "é".into(), "gpt-4oé".into(), "claude-é".into()];
        for key in table.models.keys() {
            for suffix in ["", "-", "-2025-01-01", "é", "ü-x"] {
                names.push(format!("{key}{suffix}"));
                let mut chars = key.chars();
                chars.next_back();
                names.push(format!("{}{suffix}", chars.as_str()));
            }
        }
        let mut priced = 0;
        for name in &names {
            let found = table.lookup(name).map(|price| price.key.clone());
            assert_eq!(found, every_prefix(name), "lookup of {name:?}");
            priced += usize::from(found.is_some());
        }
        assert!(priced > table.models.len(), "the names exercise matches: {priced} of {}", names.len());
    }
}
