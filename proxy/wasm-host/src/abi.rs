//! The proxy-wasm ABI v0.2.1 as numbers and wire formats: statuses, buffer / map / stream
//! types, actions, log levels, metric types, and the serialized header-map and property-path
//! encodings shared with the guest SDKs.

/// Host call results (`proxy_status_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    SerializationFailure = 3,
    ParseFailure = 4,
    Empty = 7,
    CasMismatch = 8,
    InternalFailure = 10,
    Unimplemented = 12,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferType {
    HttpRequestBody,
    HttpResponseBody,
    DownstreamData,
    UpstreamData,
    HttpCallResponseBody,
    GrpcReceiveBuffer,
    VmConfiguration,
    PluginConfiguration,
    /// Foreign function arguments (proxy_on_foreign_function reads them through buffer 8).
    CallData,
}

impl BufferType {
    pub fn from_i32(v: i32) -> Option<BufferType> {
        Some(match v {
            0 => BufferType::HttpRequestBody,
            1 => BufferType::HttpResponseBody,
            2 => BufferType::DownstreamData,
            3 => BufferType::UpstreamData,
            4 => BufferType::HttpCallResponseBody,
            5 => BufferType::GrpcReceiveBuffer,
            6 => BufferType::VmConfiguration,
            7 => BufferType::PluginConfiguration,
            8 => BufferType::CallData,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MapType {
    HttpRequestHeaders,
    HttpRequestTrailers,
    HttpResponseHeaders,
    HttpResponseTrailers,
    GrpcReceiveInitialMetadata,
    GrpcReceiveTrailingMetadata,
    HttpCallResponseHeaders,
    HttpCallResponseTrailers,
}

impl MapType {
    pub fn from_i32(v: i32) -> Option<MapType> {
        Some(match v {
            0 => MapType::HttpRequestHeaders,
            1 => MapType::HttpRequestTrailers,
            2 => MapType::HttpResponseHeaders,
            3 => MapType::HttpResponseTrailers,
            4 => MapType::GrpcReceiveInitialMetadata,
            5 => MapType::GrpcReceiveTrailingMetadata,
            6 => MapType::HttpCallResponseHeaders,
            7 => MapType::HttpCallResponseTrailers,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamType {
    HttpRequest,
    HttpResponse,
    Downstream,
    Upstream,
}

impl StreamType {
    pub fn from_i32(v: i32) -> Option<StreamType> {
        Some(match v {
            0 => StreamType::HttpRequest,
            1 => StreamType::HttpResponse,
            2 => StreamType::Downstream,
            3 => StreamType::Upstream,
            _ => return None,
        })
    }
}

/// What a filter callback returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

impl Action {
    pub fn from_i32(v: i32) -> Action {
        if v == 1 { Action::Pause } else { Action::Continue }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Critical,
}

impl LogLevel {
    pub fn from_i32(v: i32) -> LogLevel {
        match v {
            0 => LogLevel::Trace,
            1 => LogLevel::Debug,
            2 => LogLevel::Info,
            3 => LogLevel::Warn,
            4 => LogLevel::Error,
            _ => LogLevel::Critical,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
}

impl MetricType {
    pub fn from_i32(v: i32) -> Option<MetricType> {
        Some(match v {
            0 => MetricType::Counter,
            1 => MetricType::Gauge,
            2 => MetricType::Histogram,
            _ => return None,
        })
    }
}

/// A header map: ordered (name, value) pairs; names lower case; repeated names allowed.
pub type Pairs = Vec<(String, Vec<u8>)>;

/// Serializes pairs as the ABI does: count (u32 LE), then (name length, value length) per
/// pair (u32 LE each), then each name and value followed by a NUL byte.
pub fn serialize_pairs(pairs: &Pairs) -> Vec<u8> {
    let mut size = 4;
    for (k, v) in pairs {
        size += 8 + k.len() + v.len() + 2;
    }
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Parses the ABI's serialized pairs; `None` when the bytes do not hold what they claim.
pub fn deserialize_pairs(b: &[u8]) -> Option<Pairs> {
    if b.is_empty() {
        return Some(Vec::new());
    }
    let u32_at =
        |at: usize| -> Option<usize> { Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize) };
    let n = u32_at(0)?;
    // Each pair needs at least 10 bytes: refuse counts the input cannot hold before allocating.
    if n > b.len() / 10 {
        return None;
    }
    let mut lens = Vec::with_capacity(n);
    for i in 0..n {
        lens.push((u32_at(4 + i * 8)?, u32_at(8 + i * 8)?));
    }
    let mut at = 4 + n * 8;
    let mut out = Vec::with_capacity(n);
    for (kl, vl) in lens {
        let k = b.get(at..at.checked_add(kl)?)?;
        at += kl + 1;
        let v = b.get(at..at.checked_add(vl)?)?;
        at += vl + 1;
        if at > b.len() {
            return None;
        }
        out.push((String::from_utf8_lossy(k).into_owned(), v.to_vec()));
    }
    Some(out)
}

/// A property path: segments separated by NUL bytes (`request\0path`) → `request.path`.
pub fn property_path(b: &[u8]) -> String {
    let mut path = String::new();
    dotted_path(b, &mut path);
    path
}

/// [`property_path`] into `out` (cleared first), allocating only when it must grow.
pub fn dotted_path(b: &[u8], out: &mut String) {
    out.clear();
    for (i, segment) in b.split(|c| *c == 0).enumerate() {
        if i > 0 {
            out.push('.');
        }
        out.push_str(&String::from_utf8_lossy(segment));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip_and_hostile_bytes_are_refused() {
        let pairs: Pairs =
            vec![(":path".into(), b"/".to_vec()), ("x-a".into(), b"1".to_vec()), ("x-a".into(), Vec::new())];
        let b = serialize_pairs(&pairs);
        assert_eq!(deserialize_pairs(&b), Some(pairs));
        assert_eq!(deserialize_pairs(&[]), Some(Vec::new()));
        // Claims a billion pairs in 8 bytes; truncated; lengths past the end.
        assert_eq!(deserialize_pairs(&[0, 0xca, 0x9a, 0x3b, 0, 0, 0, 0]), None);
        assert_eq!(deserialize_pairs(&b[..b.len() - 3]), None);
        let mut bad = b.clone();
        bad[4] = 200;
        assert_eq!(deserialize_pairs(&bad), None);
    }

    #[test]
    fn property_paths_join_segments() {
        assert_eq!(property_path(b"request\0path"), "request.path");
        assert_eq!(property_path(b"plugin_name"), "plugin_name");
    }
}
