//! Reading configuration files: YAML (multi-document, `---`) or JSON (one object, an array, or
//! a `kind: List`), into [`Resource`] envelopes. Each document remembers where it came from, so
//! every later error can name the file and the document index.

use std::fmt;

use serde_json::Value;

use crate::meta::Resource;

/// One resource read from a file.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedDocument {
    /// The file name (or `<stdin>`).
    pub source: String,
    /// Position of the document in the file, counting from 0 and skipping empty documents.
    pub index: usize,
    pub resource: Resource,
}

impl ParsedDocument {
    /// `document N (Kind name)`, for messages about one document of a known file.
    pub fn short_origin(&self) -> String {
        format!("document {} ({} {})", self.index, self.resource.kind, self.resource.metadata.name)
    }

    /// `file: document N (Kind namespace/name)`, for messages.
    pub fn origin(&self) -> String {
        let r = &self.resource;
        let ns = r.metadata.namespace.as_deref().map(|n| format!("{n}/")).unwrap_or_default();
        format!("{}: document {} ({} {ns}{})", self.source, self.index, r.kind, r.metadata.name)
    }
}

/// A file or document that could not be read as a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub source: String,
    /// `None` when the whole file failed to parse (a syntax error).
    pub index: Option<usize>,
    pub path: String,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.index {
            Some(i) => write!(f, "{}: document {i}: {}: {}", self.source, self.path, self.message),
            None => write!(f, "{}: {}", self.source, self.message),
        }
    }
}

impl std::error::Error for ParseError {}

/// Parses every document of a file. Documents that parse are returned even when others fail,
/// so that callers can report all errors at once; callers that want all-or-nothing check that
/// the error list is empty.
pub fn parse_documents(text: &str, source: &str) -> (Vec<ParsedDocument>, Vec<ParseError>) {
    let trimmed = text.trim_start();
    let values: Vec<Value> = if trimmed.starts_with('{') || trimmed.starts_with('[') {
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Array(items)) => items,
            Ok(v) => vec![v],
            Err(e) => {
                return (
                    Vec::new(),
                    vec![ParseError {
                        source: source.into(),
                        index: None,
                        path: String::new(),
                        message: format!("invalid JSON: {e}"),
                    }],
                );
            }
        }
    } else {
        match serde_saphyr::from_multiple::<Value>(text) {
            Ok(docs) => docs,
            Err(e) => {
                return (
                    Vec::new(),
                    vec![ParseError {
                        source: source.into(),
                        index: None,
                        path: String::new(),
                        message: format!("invalid YAML: {e}"),
                    }],
                );
            }
        }
    };
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    let mut index = 0;
    for value in values {
        // kubectl's `kind: List` (what `get -o yaml` prints for several objects) is unpacked.
        let items = match &value {
            Value::Object(m) if m.get("kind").and_then(Value::as_str) == Some("List") => {
                m.get("items").and_then(Value::as_array).cloned().unwrap_or_default()
            }
            Value::Null => continue,
            _ => vec![value],
        };
        for item in items {
            match parse_resource(item) {
                Ok(resource) => docs.push(ParsedDocument { source: source.into(), index, resource }),
                Err((path, message)) => {
                    errors.push(ParseError { source: source.into(), index: Some(index), path, message })
                }
            }
            index += 1;
        }
    }
    (docs, errors)
}

/// Parses one JSON value as a resource envelope; the error is (field path, message).
pub fn parse_resource(value: Value) -> Result<Resource, (String, String)> {
    if !value.is_object() {
        return Err((String::new(), "a document must be a mapping with apiVersion, kind, metadata and spec".into()));
    }
    for field in ["apiVersion", "kind"] {
        if !value.get(field).is_some_and(Value::is_string) {
            return Err((field.into(), "required (a string)".into()));
        }
    }
    serde_path_to_error::deserialize::<_, Resource>(value).map_err(|e| {
        let path = e.path().to_string();
        (if path == "." { String::new() } else { path }, crate::validate::yaml_hint(e.into_inner().to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_yaml_keeps_indices_and_skips_empty_documents() {
        let text = "---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: a}\n---\n---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: b}\n";
        let (docs, errors) = parse_documents(text, "f.yaml");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].index, 1);
        assert_eq!(docs[1].resource.metadata.name, "b");
    }

    #[test]
    fn json_arrays_and_lists_are_unpacked() {
        let one = r#"{"apiVersion":"networking.istio.io/v1","kind":"Gateway","metadata":{"name":"a"}}"#;
        let (docs, errors) = parse_documents(&format!("[{one},{one}]"), "f.json");
        assert!(errors.is_empty());
        assert_eq!(docs.len(), 2);
        let list = format!(r#"{{"apiVersion":"v1","kind":"List","items":[{one}]}}"#);
        let (docs, errors) = parse_documents(&list, "l.json");
        assert!(errors.is_empty());
        assert_eq!(docs.len(), 1);
    }

    #[test]
    fn syntax_errors_name_the_file() {
        let (docs, errors) = parse_documents("a: [1, 2\n", "bad.yaml");
        assert!(docs.is_empty());
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().starts_with("bad.yaml: invalid YAML"), "{}", errors[0]);
    }

    #[test]
    fn unknown_top_level_fields_are_named() {
        let text = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: a}\nspecc: {}\n";
        let (_, errors) = parse_documents(text, "f.yaml");
        assert_eq!(errors.len(), 1);
        assert!(errors[0].message.contains("specc"), "{}", errors[0]);
        assert_eq!(errors[0].index, Some(0));
    }
}

#[cfg(test)]
mod hostile_input {
    use super::*;

    #[test]
    fn alias_bombs_are_refused_not_expanded() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            text.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n",
                p = i - 1
            ));
        }
        let start = std::time::Instant::now();
        let (docs, errors) = parse_documents(&text, "bomb.yaml");
        assert!(docs.is_empty());
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let deep_json = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let (_, errors) = parse_documents(&deep_json, "deep.json");
        assert_eq!(errors.len(), 1);
        let deep_yaml = format!("a: {}{}", "[".repeat(100_000), "]".repeat(100_000));
        let (_, errors) = parse_documents(&deep_yaml, "deep.yaml");
        assert_eq!(errors.len(), 1);
    }

    #[test]
    fn documents_of_the_wrong_shape_are_errors() {
        for text in ["42", "- a\n- b\n", "\"just a string\"", "apiVersion: 5\nkind: Gateway\n", "kind: Gateway\n"] {
            let (docs, errors) = parse_documents(text, "odd.yaml");
            assert!(docs.is_empty() && errors.len() == 1, "{text:?}: {docs:?} {errors:?}");
        }
    }
}
