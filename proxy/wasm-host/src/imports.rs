//! The `env` imports of proxy-wasm ABI v0.2.1 (plus the 0.2.0 names modules built for older
//! Envoys still import) and the WASI preview-1 functions wasip1 modules import. Every guest
//! pointer is bounds-checked: a bad one is `BadArgument`, never a host fault. Values returned
//! to the guest are allocated with its own allocator (`proxy_on_memory_allocate`, or
//! `malloc` for modules built for `wasm32-unknown-unknown`).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use wasmtime::{Caller, Extern, Linker, Memory};

use crate::abi::{
    BufferType, LogLevel, MapType, MetricType, Pairs, Status, StreamType, deserialize_pairs, dotted_path,
    property_path, serialize_pairs,
};
use crate::state::{Callout, GrpcOp, GrpcOpen, LocalResponse, VmState};

type C<'a> = Caller<'a, VmState>;
type R = wasmtime::Result<i32>;

const OK: R = Ok(Status::Ok as i32);

fn st(s: Status) -> R {
    Ok(s as i32)
}

fn memory(c: &mut C<'_>) -> Option<Memory> {
    // Looked up once per VM; a call made while the module instantiates looks it up itself.
    c.data().memory.or_else(|| c.get_export("memory").and_then(Extern::into_memory))
}

/// Guest bytes at `ptr..ptr+len`, copied out.
fn read(c: &mut C<'_>, ptr: i32, len: i32) -> Option<Vec<u8>> {
    let mem = memory(c)?;
    let (start, len) = (ptr as u32 as usize, len as u32 as usize);
    mem.data(&*c).get(start..start.checked_add(len)?).map(<[u8]>::to_vec)
}

fn read_str(c: &mut C<'_>, ptr: i32, len: i32) -> Option<String> {
    read(c, ptr, len)
        .map(|b| String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

/// `ptr..ptr+len` of guest memory `data`, when in bounds.
fn slice(data: &[u8], ptr: i32, len: i32) -> Option<&[u8]> {
    let start = ptr as u32 as usize;
    data.get(start..start.checked_add(len as u32 as usize)?)
}

/// Guest memory and the VM's state together, so a call can read its arguments in place
/// instead of copying them out (the calls every request makes).
fn memory_and_state<'a>(c: &'a mut C<'_>) -> Option<(&'a mut [u8], &'a mut VmState)> {
    let mem = memory(c)?;
    Some(mem.data_and_store_mut(c))
}

/// Hands `value` (the VM's scratch buffer, filled by the caller) to the guest and keeps the
/// buffer for the next call.
fn give_scratch(c: &mut C<'_>, value: Vec<u8>, ret_ptr: i32, ret_size: i32) -> R {
    let r = give(c, &value, ret_ptr, ret_size);
    c.data_mut().scratch = value;
    st(r?)
}

fn write(c: &mut C<'_>, ptr: i32, bytes: &[u8]) -> bool {
    let Some(mem) = memory(c) else { return false };
    let start = ptr as u32 as usize;
    match mem.data_mut(&mut *c).get_mut(start..start + bytes.len()) {
        Some(dst) => {
            dst.copy_from_slice(bytes);
            true
        }
        None => false,
    }
}

fn write_u32(c: &mut C<'_>, ptr: i32, v: u32) -> bool {
    write(c, ptr, &v.to_le_bytes())
}

/// Copies `bytes` into memory the guest allocates, and stores its address and size at
/// `ret_ptr` / `ret_size`.
fn give(c: &mut C<'_>, bytes: &[u8], ret_ptr: i32, ret_size: i32) -> wasmtime::Result<Status> {
    let alloc = match c.data().alloc.clone() {
        Some(f) => f,
        None => std::sync::Arc::new(
            c.get_export("proxy_on_memory_allocate")
                .or_else(|| c.get_export("malloc"))
                .and_then(Extern::into_func)
                .ok_or_else(|| wasmtime::Error::msg("module exports no allocator"))?
                .typed::<i32, i32>(&*c)?,
        ),
    };
    let addr = if bytes.is_empty() { 0 } else { alloc.call(&mut *c, bytes.len() as i32)? };
    let Some(mem) = memory(c) else { return Ok(Status::InternalFailure) };
    // One look at the memory for the three writes.
    let data = mem.data_mut(&mut *c);
    let mut put = |at: i32, b: &[u8]| {
        let start = at as u32 as usize;
        data.get_mut(start..start + b.len()).map(|dst| dst.copy_from_slice(b)).is_some()
    };
    if (!bytes.is_empty() && (addr == 0 || !put(addr, bytes)))
        || !put(ret_ptr, &(addr as u32).to_le_bytes())
        || !put(ret_size, &(bytes.len() as u32).to_le_bytes())
    {
        return Ok(Status::InternalFailure);
    }
    Ok(Status::Ok)
}

/// Notes that a filter changes a header map (before a write).
fn mark_changed(s: &mut VmState, t: MapType) {
    if let Some(st) = s.stream() {
        match t {
            MapType::HttpRequestHeaders => st.request_headers_changed = true,
            MapType::HttpResponseHeaders => st.response_headers_changed = true,
            _ => {}
        }
    }
}

/// Where a header map lives: shared between the filters of a chain (copied on the first
/// write), or the filter's own.
enum MapSlot<'a> {
    Shared(&'a mut Arc<Pairs>),
    Own(&'a mut Pairs),
}

/// A header map, if it is there now (Envoy answers BadArgument for one that is not).
fn map_slot(s: &mut VmState, t: MapType) -> Result<MapSlot<'_>, Status> {
    if matches!(t, MapType::HttpCallResponseHeaders | MapType::HttpCallResponseTrailers) {
        let (h, _, tr) = s.call_response.as_mut().ok_or(Status::BadArgument)?;
        return Ok(MapSlot::Own(if t == MapType::HttpCallResponseHeaders { h } else { tr }));
    }
    if matches!(t, MapType::GrpcReceiveInitialMetadata | MapType::GrpcReceiveTrailingMetadata) {
        return match &mut s.grpc_metadata {
            Some((kind, pairs)) if *kind == t => Ok(MapSlot::Own(pairs)),
            _ => Err(Status::BadArgument),
        };
    }
    let stream = s.stream().ok_or(Status::BadArgument)?;
    Ok(match t {
        MapType::HttpRequestHeaders if stream.request_headers_open => MapSlot::Shared(&mut stream.request_headers),
        MapType::HttpRequestTrailers => MapSlot::Own(&mut stream.request_trailers),
        MapType::HttpResponseHeaders if stream.response_headers_open => MapSlot::Shared(&mut stream.response_headers),
        MapType::HttpResponseTrailers => MapSlot::Own(&mut stream.response_trailers),
        _ => return Err(Status::BadArgument),
    })
}

/// A header map to read.
fn map_ref(s: &mut VmState, t: MapType) -> Result<&Pairs, Status> {
    Ok(match map_slot(s, t)? {
        MapSlot::Shared(m) => &**m,
        MapSlot::Own(m) => &*m,
    })
}

/// A header map to change.
fn map_mut(s: &mut VmState, t: MapType) -> Result<&mut Pairs, Status> {
    Ok(match map_slot(s, t)? {
        MapSlot::Shared(m) => Arc::make_mut(m),
        MapSlot::Own(m) => m,
    })
}

fn buffer(s: &mut VmState, t: BufferType) -> Option<Vec<u8>> {
    Some(match t {
        BufferType::PluginConfiguration => s.plugin.configuration.clone(),
        BufferType::VmConfiguration => s.plugin.vm_configuration.clone(),
        BufferType::HttpCallResponseBody => s.call_response.as_ref()?.1.clone(),
        BufferType::CallData | BufferType::GrpcReceiveBuffer => s.call_data.clone(),
        BufferType::HttpRequestBody => s.stream()?.request_body.clone(),
        BufferType::HttpResponseBody => s.stream()?.response_body.clone(),
        BufferType::DownstreamData | BufferType::UpstreamData => return None,
    })
}

/// Properties the VM knows without a stream: the plugin's, and the host's (`node.*`, set by
/// the embedder with `Host::set_property`).
fn vm_property(s: &VmState, path: &str) -> Option<Vec<u8>> {
    Some(match path {
        "plugin_name" => s.plugin.name.as_bytes().to_vec(),
        "plugin_root_id" => s.plugin.root_id.as_bytes().to_vec(),
        "plugin_vm_id" => s.plugin.vm_id.as_bytes().to_vec(),
        _ => return s.host_properties.get(path).cloned(),
    })
}

/// Properties derived from a stream's headers, in Envoy's encodings: `request.headers.NAME`,
/// `response.headers.NAME`, `response.trailers.NAME`, `request.useragent`, `request.referer`,
/// `request.query`, `response.grpc_status` (int64).
fn derived_property(s: &crate::state::Stream, path: &str) -> Option<Vec<u8>> {
    let get = |pairs: &crate::abi::Pairs, name: &str| {
        let name = name.to_ascii_lowercase();
        pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone())
    };
    if let Some(h) = path.strip_prefix("request.headers.") {
        return get(&s.request_headers, h);
    }
    if let Some(h) = path.strip_prefix("response.headers.") {
        return get(&s.response_headers, h);
    }
    if let Some(h) = path.strip_prefix("response.trailers.") {
        return get(&s.response_trailers, h);
    }
    match path {
        "request.path" => get(&s.request_headers, ":path"),
        "request.url_path" => {
            let p = get(&s.request_headers, ":path")?;
            let end = p.iter().position(|b| *b == b'?').unwrap_or(p.len());
            Some(p[..end].to_vec())
        }
        "request.method" => get(&s.request_headers, ":method"),
        "request.host" => get(&s.request_headers, ":authority"),
        "request.scheme" => get(&s.request_headers, ":scheme"),
        "request.id" => get(&s.request_headers, "x-request-id"),
        "request.useragent" => get(&s.request_headers, "user-agent"),
        "request.referer" => get(&s.request_headers, "referer"),
        "request.query" => {
            let p = get(&s.request_headers, ":path")?;
            let i = p.iter().position(|b| *b == b'?')?;
            Some(p[i + 1..].to_vec())
        }
        "response.grpc_status" => {
            let v = get(&s.response_headers, "grpc-status").or_else(|| get(&s.response_trailers, "grpc-status"))?;
            let code: i64 = String::from_utf8_lossy(&v).trim().parse().ok()?;
            Some(code.to_le_bytes().to_vec())
        }
        _ => None,
    }
}

/// Foreign functions Trellis's host implements itself: `trellis.body_interest` (two bytes:
/// whether the module reads request / response bodies, the embedder skipping body callbacks it
/// does not need; an optional third: what it needs at a stream's end, 0 = the host calls only
/// `proxy_on_delete`, 1 = `proxy_on_log` and `proxy_on_done` too, 2 = `proxy_on_log` too (the
/// proxy-wasm crate's `on_done` does nothing unless a filter overrides it); an optional fourth:
/// whether it needs `proxy_on_response_headers`, 0 = never called) and those that act on the
/// current stream, for the embedder to carry out:
/// `trellis.retain_request` (keep the request body for a re-send) and `trellis.resend`
/// (argument: the delay in milliseconds as a little-endian u32, or nothing for none; only from
/// a response-headers callback). `None`: not one of these.
fn stream_function(s: &mut VmState, name: &str, args: &[u8]) -> Option<Status> {
    if name == "trellis.body_interest" {
        // [request body, response body, (stream end), (response headers)]: 0 = the module
        // never needs it.
        let (req, resp, end, headers) = match args {
            [req, resp] => (*req, *resp, 1, 1),
            [req, resp, end] => (*req, *resp, *end, 1),
            [req, resp, end, headers] => (*req, *resp, *end, *headers),
            _ => return Some(Status::BadArgument),
        };
        s.body_interest = Some((req != 0, resp != 0));
        s.end_interest = (end != 0, end != 0 && end != 2);
        s.response_interest = headers != 0;
        return Some(Status::Ok);
    }
    let stream = match name {
        "trellis.retain_request" | "trellis.resend" => s.stream(),
        _ => return None,
    };
    let Some(stream) = stream else { return Some(Status::NotFound) };
    if name == "trellis.retain_request" {
        stream.retain_request = true;
        return Some(Status::Ok);
    }
    if stream.response_headers.is_empty() {
        return Some(Status::BadArgument);
    }
    let delay = match args.len() {
        0 => 0,
        4 => u32::from_le_bytes([args[0], args[1], args[2], args[3]]),
        _ => return Some(Status::BadArgument),
    };
    stream.resend = Some(delay);
    Some(Status::Ok)
}

/// `trellis.shared_add`: arguments are a little-endian i64 delta then the key; adds the delta
/// to the shared-data value under the key (a little-endian i64, absent = 0) in one step and
/// answers the new value (8 bytes). The value and its CAS are those of `proxy_get_shared_data`
/// / `proxy_set_shared_data`, so CAS updates of the same key mix with it.
fn shared_add(s: &VmState, args: &[u8]) -> Result<i64, Status> {
    let (Some(delta), Ok(key)) = (args.get(..8), std::str::from_utf8(args.get(8..).unwrap_or_default())) else {
        return Err(Status::BadArgument);
    };
    let delta = i64::from_le_bytes(delta.try_into().unwrap_or_default());
    let mut data = s.shared.data.lock().unwrap_or_else(|p| p.into_inner());
    let next = match data.get_mut(key) {
        Some((value, cas)) => {
            let Ok(current) = <[u8; 8]>::try_from(value.as_slice()) else { return Err(Status::BadArgument) };
            let next = i64::from_le_bytes(current).wrapping_add(delta);
            *value = next.to_le_bytes().to_vec();
            *cas = cas.wrapping_add(1).max(1);
            next
        }
        None => {
            data.insert(key.to_string(), (delta.to_le_bytes().to_vec(), 1));
            delta
        }
    };
    Ok(next)
}

fn now_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// A gRPC call (`message` given) or stream (none): recorded for the embedder to perform; the
/// token goes to `ret`. `strings` holds (pointer, length) of upstream, service, method and
/// initial metadata.
fn grpc_callout(mut c: C<'_>, strings: [i32; 8], message: Option<(i32, i32)>, timeout: i32, ret: i32) -> R {
    let [up, ul, sp, sl, mp, ml, ip, il] = strings;
    let (Some(upstream), Some(service), Some(method), Some(metadata)) =
        (read_str(&mut c, up, ul), read_str(&mut c, sp, sl), read_str(&mut c, mp, ml), read(&mut c, ip, il))
    else {
        return st(Status::BadArgument);
    };
    let message = match message {
        Some((p, l)) => match read(&mut c, p, l) {
            Some(m) => Some(m),
            None => return st(Status::BadArgument),
        },
        None => None,
    };
    let Some(metadata) = deserialize_pairs(&metadata) else { return st(Status::SerializationFailure) };
    let s = c.data_mut();
    s.next_token += 1;
    let token = s.next_token;
    let context = s.effective_context;
    let stream = message.is_none();
    let message = message.unwrap_or_default();
    s.grpc_open.insert(token, GrpcOpen { context, stream, local_closed: false, remote_closed: false });
    s.callouts.push(Callout::Grpc {
        token,
        context,
        upstream,
        service,
        method,
        metadata,
        message,
        timeout_ms: timeout as u32,
        stream,
    });
    st(if write_u32(&mut c, ret, token) { Status::Ok } else { Status::BadArgument })
}

/// Forgets an open gRPC call or stream: nothing more is delivered for it, and a call not yet
/// started never starts. False if `token` is not open.
pub(crate) fn cancel_grpc(s: &mut VmState, token: u32) -> bool {
    if s.grpc_open.remove(&token).is_none() {
        return false;
    }
    s.grpc_ended.push(token);
    s.callouts.retain(|k| k.token() != token);
    s.grpc_ops.retain(|(t, _)| *t != token);
    true
}

/// Defines every import on `linker`.
pub fn define(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    let env = "env";
    linker.func_wrap(env, "proxy_log", |mut c: C<'_>, level: i32, ptr: i32, len: i32| -> R {
        let Some(msg) = read_str(&mut c, ptr, len) else { return st(Status::BadArgument) };
        c.data_mut().log(LogLevel::from_i32(level), msg);
        OK
    })?;
    linker.func_wrap(env, "proxy_get_log_level", |mut c: C<'_>, ret: i32| -> R {
        let level = c.data().log_level as u32;
        st(if write_u32(&mut c, ret, level) { Status::Ok } else { Status::BadArgument })
    })?;
    linker.func_wrap(env, "proxy_get_current_time_nanoseconds", |mut c: C<'_>, ret: i32| -> R {
        st(if write(&mut c, ret, &now_nanos().to_le_bytes()) { Status::Ok } else { Status::BadArgument })
    })?;
    linker.func_wrap(env, "proxy_set_tick_period_milliseconds", |mut c: C<'_>, period: i32| -> R {
        c.data_mut().tick_period_ms = period as u32;
        OK
    })?;
    linker.func_wrap(
        env,
        "proxy_get_buffer_bytes",
        |mut c: C<'_>, kind: i32, start: i32, max: i32, ret_ptr: i32, ret_size: i32| -> R {
            let Some(t) = BufferType::from_i32(kind) else { return st(Status::BadArgument) };
            let Some(buf) = buffer(c.data_mut(), t) else { return st(Status::NotFound) };
            let (start, max) = (start as u32 as usize, max as u32 as usize);
            if start > buf.len() {
                return st(Status::BadArgument);
            }
            let end = start.saturating_add(max).min(buf.len());
            st(give(&mut c, &buf[start..end], ret_ptr, ret_size)?)
        },
    )?;
    linker.func_wrap(
        env,
        "proxy_set_buffer_bytes",
        |mut c: C<'_>, kind: i32, start: i32, size: i32, ptr: i32, len: i32| -> R {
            let Some(t) = BufferType::from_i32(kind) else { return st(Status::BadArgument) };
            let Some(data) = read(&mut c, ptr, len) else { return st(Status::BadArgument) };
            let Some(stream) = c.data_mut().stream() else { return st(Status::NotFound) };
            let buf = match t {
                BufferType::HttpRequestBody => &mut stream.request_body,
                BufferType::HttpResponseBody => &mut stream.response_body,
                _ => return st(Status::BadArgument),
            };
            // Replace `size` bytes at `start` (Envoy: start 0 + size 0 prepends, start = len appends).
            let start = (start as u32 as usize).min(buf.len());
            let end = start.saturating_add(size as u32 as usize).min(buf.len());
            buf.splice(start..end, data);
            OK
        },
    )?;
    linker.func_wrap(
        env,
        "proxy_get_header_map_pairs",
        |mut c: C<'_>, kind: i32, ret_ptr: i32, ret_size: i32| -> R {
            let Some(t) = MapType::from_i32(kind) else { return st(Status::BadArgument) };
            let map = match map_ref(c.data_mut(), t) {
                Ok(m) => m,
                Err(e) => return st(e),
            };
            let bytes = serialize_pairs(map);
            st(give(&mut c, &bytes, ret_ptr, ret_size)?)
        },
    )?;
    linker.func_wrap(env, "proxy_set_header_map_pairs", |mut c: C<'_>, kind: i32, ptr: i32, len: i32| -> R {
        let Some(t) = MapType::from_i32(kind) else { return st(Status::BadArgument) };
        let Some(bytes) = read(&mut c, ptr, len) else { return st(Status::BadArgument) };
        let Some(pairs) = deserialize_pairs(&bytes) else { return st(Status::SerializationFailure) };
        mark_changed(c.data_mut(), t);
        let map = match map_mut(c.data_mut(), t) {
            Ok(m) => m,
            Err(e) => return st(e),
        };
        *map = pairs.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect();
        OK
    })?;
    linker.func_wrap(
        env,
        "proxy_get_header_map_value",
        |mut c: C<'_>, kind: i32, kp: i32, kl: i32, ret_ptr: i32, ret_size: i32| -> R {
            let Some(t) = MapType::from_i32(kind) else { return st(Status::BadArgument) };
            let Some((data, s)) = memory_and_state(&mut c) else { return st(Status::BadArgument) };
            let Some(key) = slice(data, kp, kl) else { return st(Status::BadArgument) };
            let mut joined = std::mem::take(&mut s.scratch);
            joined.clear();
            let map = match map_ref(s, t) {
                Ok(m) => m,
                Err(e) => return st(e),
            };
            // Names are kept lower-case; repeated headers are joined with commas, as Envoy does.
            let mut found = false;
            for (_, v) in map.iter().filter(|(k, _)| k.as_bytes().eq_ignore_ascii_case(key)) {
                if found {
                    joined.push(b',');
                }
                joined.extend_from_slice(v);
                found = true;
            }
            if !found {
                s.scratch = joined;
                return st(Status::NotFound);
            }
            give_scratch(&mut c, joined, ret_ptr, ret_size)
        },
    )?;
    for (name, op) in [("proxy_replace_header_map_value", 0), ("proxy_add_header_map_value", 1)] {
        linker.func_wrap(env, name, move |mut c: C<'_>, kind: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> R {
            let Some(t) = MapType::from_i32(kind) else { return st(Status::BadArgument) };
            let (Some(key), Some(value)) = (read_str(&mut c, kp, kl), read(&mut c, vp, vl)) else {
                return st(Status::BadArgument);
            };
            let key = key.to_ascii_lowercase();
            mark_changed(c.data_mut(), t);
            let map = match map_mut(c.data_mut(), t) {
                Ok(m) => m,
                Err(e) => return st(e),
            };
            if op == 0 {
                map.retain(|(k, _)| *k != key);
            }
            map.push((key, value));
            OK
        })?;
    }
    linker.func_wrap(env, "proxy_remove_header_map_value", |mut c: C<'_>, kind: i32, kp: i32, kl: i32| -> R {
        let Some(t) = MapType::from_i32(kind) else { return st(Status::BadArgument) };
        let Some(key) = read_str(&mut c, kp, kl) else { return st(Status::BadArgument) };
        let key = key.to_ascii_lowercase();
        mark_changed(c.data_mut(), t);
        let map = match map_mut(c.data_mut(), t) {
            Ok(m) => m,
            Err(e) => return st(e),
        };
        map.retain(|(k, _)| *k != key);
        OK
    })?;
    linker.func_wrap(env, "proxy_get_header_map_size", |mut c: C<'_>, kind: i32, ret: i32| -> R {
        let Some(t) = MapType::from_i32(kind) else { return st(Status::BadArgument) };
        let map = match map_ref(c.data_mut(), t) {
            Ok(m) => m,
            Err(e) => return st(e),
        };
        let size = serialize_pairs(map).len() as u32;
        st(if write_u32(&mut c, ret, size) { Status::Ok } else { Status::BadArgument })
    })?;
    linker.func_wrap(
        env,
        "proxy_get_property",
        |mut c: C<'_>, pp: i32, pl: i32, ret_ptr: i32, ret_size: i32| -> R {
            // Read in place and answered from the VM's scratch buffers: filters read
            // properties (route_name, ...) on every request.
            let Some((data, s)) = memory_and_state(&mut c) else { return st(Status::BadArgument) };
            let Some(raw) = slice(data, pp, pl) else { return st(Status::BadArgument) };
            let mut path = std::mem::take(&mut s.scratch_path);
            dotted_path(raw, &mut path);
            let mut value = std::mem::take(&mut s.scratch);
            value.clear();
            let found = match s.streams.get(&s.effective_context) {
                Some(st) => match st.properties.get(&path) {
                    Some(v) => {
                        value.extend_from_slice(v);
                        true
                    }
                    None => {
                        st.response_properties.get_into(&path, &mut value)
                            || st.request_properties.get_into(&path, &mut value)
                            || derived_property(st, &path).map(|v| value.extend_from_slice(&v)).is_some()
                    }
                },
                None => false,
            } || vm_property(s, &path).map(|v| value.extend_from_slice(&v)).is_some();
            s.scratch_path = path;
            if !found {
                s.scratch = value;
                return st(Status::NotFound);
            }
            give_scratch(&mut c, value, ret_ptr, ret_size)
        },
    )?;
    linker.func_wrap(env, "proxy_set_property", |mut c: C<'_>, pp: i32, pl: i32, vp: i32, vl: i32| -> R {
        let (Some(raw), Some(value)) = (read(&mut c, pp, pl), read(&mut c, vp, vl)) else {
            return st(Status::BadArgument);
        };
        let path = property_path(&raw);
        match c.data_mut().stream() {
            Some(s) => {
                s.properties.insert(path, value);
                OK
            }
            None => st(Status::NotFound),
        }
    })?;
    linker.func_wrap(
        env,
        "proxy_get_shared_data",
        |mut c: C<'_>, kp: i32, kl: i32, ret_ptr: i32, ret_size: i32, ret_cas: i32| -> R {
            let Some(key) = read_str(&mut c, kp, kl) else { return st(Status::BadArgument) };
            let found = c.data().shared.data.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned();
            let Some((value, cas)) = found else { return st(Status::NotFound) };
            if !write_u32(&mut c, ret_cas, cas) {
                return st(Status::BadArgument);
            }
            st(give(&mut c, &value, ret_ptr, ret_size)?)
        },
    )?;
    linker.func_wrap(
        env,
        "proxy_set_shared_data",
        |mut c: C<'_>, kp: i32, kl: i32, vp: i32, vl: i32, cas: i32| -> R {
            let (Some(key), Some(value)) = (read_str(&mut c, kp, kl), read(&mut c, vp, vl)) else {
                return st(Status::BadArgument);
            };
            let shared = c.data().shared.clone();
            let mut data = shared.data.lock().unwrap_or_else(|p| p.into_inner());
            let current = data.get(&key).map(|(_, c)| *c).unwrap_or(0);
            if cas != 0 && cas as u32 != current {
                return st(Status::CasMismatch);
            }
            data.insert(key, (value, current.wrapping_add(1).max(1)));
            OK
        },
    )?;
    linker.func_wrap(env, "proxy_register_shared_queue", |mut c: C<'_>, np: i32, nl: i32, ret: i32| -> R {
        let Some(name) = read_str(&mut c, np, nl) else { return st(Status::BadArgument) };
        let root = c.data().root_context;
        let shared = c.data().shared.clone();
        let id = {
            let mut queues = shared.queues.lock().unwrap_or_else(|p| p.into_inner());
            match queues.iter().position(|(n, _, _)| *n == name) {
                Some(i) => {
                    queues[i].2 = root;
                    i
                }
                None => {
                    queues.push((name, Default::default(), root));
                    queues.len() - 1
                }
            }
        };
        st(if write_u32(&mut c, ret, id as u32) { Status::Ok } else { Status::BadArgument })
    })?;
    linker.func_wrap(
        env,
        "proxy_resolve_shared_queue",
        |mut c: C<'_>, _vp: i32, _vl: i32, np: i32, nl: i32, ret: i32| -> R {
            // Queues are resolved within this VM's vm_id group.
            let Some(name) = read_str(&mut c, np, nl) else { return st(Status::BadArgument) };
            let id = c
                .data()
                .shared
                .queues
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .position(|(n, _, _)| *n == name);
            match id {
                Some(id) => st(if write_u32(&mut c, ret, id as u32) { Status::Ok } else { Status::BadArgument }),
                None => st(Status::NotFound),
            }
        },
    )?;
    linker.func_wrap(env, "proxy_enqueue_shared_queue", |mut c: C<'_>, id: i32, vp: i32, vl: i32| -> R {
        let Some(value) = read(&mut c, vp, vl) else { return st(Status::BadArgument) };
        let shared = c.data().shared.clone();
        let mut queues = shared.queues.lock().unwrap_or_else(|p| p.into_inner());
        let Some((_, items, owner)) = queues.get_mut(id as u32 as usize) else { return st(Status::NotFound) };
        items.push_back(value);
        let owner = *owner;
        drop(queues);
        c.data_mut().queue_ready.push((owner, id as u32));
        OK
    })?;
    linker.func_wrap(env, "proxy_dequeue_shared_queue", |mut c: C<'_>, id: i32, ret_ptr: i32, ret_size: i32| -> R {
        let shared = c.data().shared.clone();
        let item = {
            let mut queues = shared.queues.lock().unwrap_or_else(|p| p.into_inner());
            let Some((_, items, _)) = queues.get_mut(id as u32 as usize) else { return st(Status::NotFound) };
            items.pop_front()
        };
        match item {
            Some(v) => st(give(&mut c, &v, ret_ptr, ret_size)?),
            None => st(Status::Empty),
        }
    })?;
    for (name, op) in [
        ("proxy_continue_stream", 0),
        ("proxy_close_stream", 1),
        ("proxy_continue_request", 2),
        ("proxy_continue_response", 3),
    ] {
        let f = move |mut c: C<'_>, kind: i32| -> R {
            let t = match op {
                2 => StreamType::HttpRequest,
                3 => StreamType::HttpResponse,
                _ => match StreamType::from_i32(kind) {
                    Some(t) => t,
                    None => return st(Status::BadArgument),
                },
            };
            let Some(s) = c.data_mut().stream() else { return st(Status::NotFound) };
            if op == 1 {
                s.closed.push(t)
            } else {
                match t {
                    StreamType::HttpRequest => s.request_headers_open = false,
                    StreamType::HttpResponse => s.response_headers_open = false,
                    _ => {}
                }
                s.resumed.push(t)
            }
            OK
        };
        if op >= 2 {
            linker.func_wrap(env, name, move |c: C<'_>| -> R { f(c, 0) })?;
        } else {
            linker.func_wrap(env, name, f)?;
        }
    }
    linker.func_wrap(env, "proxy_clear_route_cache", |_c: C<'_>| -> R { OK })?;
    linker.func_wrap(
        env,
        "proxy_send_local_response",
        |mut c: C<'_>, status: i32, dp: i32, dl: i32, bp: i32, bl: i32, hp: i32, hl: i32, grpc: i32| -> R {
            let (Some(details), Some(body), Some(headers)) =
                (read_str(&mut c, dp, dl), read(&mut c, bp, bl), read(&mut c, hp, hl))
            else {
                return st(Status::BadArgument);
            };
            let Some(headers) = deserialize_pairs(&headers) else { return st(Status::SerializationFailure) };
            let Some(s) = c.data_mut().stream() else { return st(Status::NotFound) };
            s.local_response =
                Some(Box::new(LocalResponse { status: status as u32, details, body, headers, grpc_status: grpc }));
            OK
        },
    )?;
    linker.func_wrap(
        env,
        "proxy_http_call",
        |mut c: C<'_>,
         up: i32,
         ul: i32,
         hp: i32,
         hl: i32,
         bp: i32,
         bl: i32,
         tp: i32,
         tl: i32,
         timeout: i32,
         ret: i32|
         -> R {
            let (Some(upstream), Some(headers), Some(body), Some(trailers)) =
                (read_str(&mut c, up, ul), read(&mut c, hp, hl), read(&mut c, bp, bl), read(&mut c, tp, tl))
            else {
                return st(Status::BadArgument);
            };
            let (Some(headers), Some(trailers)) = (deserialize_pairs(&headers), deserialize_pairs(&trailers)) else {
                return st(Status::SerializationFailure);
            };
            let s = c.data_mut();
            s.next_token += 1;
            let token = s.next_token;
            let context = s.effective_context;
            s.callouts.push(Callout::Http {
                token,
                context,
                upstream,
                headers,
                body,
                trailers,
                timeout_ms: timeout as u32,
            });
            st(if write_u32(&mut c, ret, token) { Status::Ok } else { Status::BadArgument })
        },
    )?;
    linker.func_wrap(
        env,
        "proxy_grpc_call",
        |c: C<'_>,
         up: i32,
         ul: i32,
         sp: i32,
         sl: i32,
         mp: i32,
         ml: i32,
         ip: i32,
         il: i32,
         msgp: i32,
         msgl: i32,
         timeout: i32,
         ret: i32|
         -> R { grpc_callout(c, [up, ul, sp, sl, mp, ml, ip, il], Some((msgp, msgl)), timeout, ret) },
    )?;
    linker.func_wrap(
        env,
        "proxy_grpc_stream",
        |c: C<'_>, up: i32, ul: i32, sp: i32, sl: i32, mp: i32, ml: i32, ip: i32, il: i32, ret: i32| -> R {
            grpc_callout(c, [up, ul, sp, sl, mp, ml, ip, il], None, 0, ret)
        },
    )?;
    linker.func_wrap(env, "proxy_grpc_send", |mut c: C<'_>, token: i32, mp: i32, ml: i32, end: i32| -> R {
        let token = token as u32;
        let Some(message) = read(&mut c, mp, ml) else { return st(Status::BadArgument) };
        let s = c.data_mut();
        let Some(open) = s.grpc_open.get_mut(&token) else { return st(Status::NotFound) };
        if !open.stream {
            return st(Status::BadArgument);
        }
        // After a half-close, or once the server closed, there is nobody to send to (Envoy
        // drops such messages too).
        if !open.local_closed && !open.remote_closed {
            open.local_closed = end != 0;
            s.grpc_ops.push((token, GrpcOp::Send { message, end_stream: end != 0 }));
        }
        OK
    })?;
    linker.func_wrap(env, "proxy_grpc_cancel", |mut c: C<'_>, token: i32| -> R {
        st(if cancel_grpc(c.data_mut(), token as u32) { Status::Ok } else { Status::NotFound })
    })?;
    linker.func_wrap(env, "proxy_grpc_close", |mut c: C<'_>, token: i32| -> R {
        let token = token as u32;
        let s = c.data_mut();
        match s.grpc_open.get(&token).copied() {
            None => st(Status::NotFound),
            // Closing a unary call cancels it, as in Envoy.
            Some(open) if !open.stream => st(if cancel_grpc(s, token) { Status::Ok } else { Status::NotFound }),
            Some(open) => {
                if !open.local_closed && !open.remote_closed {
                    s.grpc_ops.push((token, GrpcOp::Close));
                }
                if open.remote_closed {
                    s.grpc_open.remove(&token);
                    s.grpc_ended.push(token);
                } else if let Some(o) = s.grpc_open.get_mut(&token) {
                    o.local_closed = true;
                }
                OK
            }
        }
    })?;
    linker.func_wrap(env, "proxy_get_status", |mut c: C<'_>, ret_code: i32, ret_ptr: i32, ret_size: i32| -> R {
        let (code, message) = c.data().grpc_status.clone();
        if !write_u32(&mut c, ret_code, code) {
            return st(Status::BadArgument);
        }
        st(give(&mut c, message.as_bytes(), ret_ptr, ret_size)?)
    })?;
    linker.func_wrap(env, "proxy_set_effective_context", |mut c: C<'_>, id: i32| -> R {
        let s = c.data_mut();
        let id = id as u32;
        if id != s.root_context && !s.streams.contains_key(&id) {
            return st(Status::BadArgument);
        }
        s.effective_context = id;
        OK
    })?;
    linker.func_wrap(env, "proxy_done", |mut c: C<'_>| -> R {
        let s = c.data_mut();
        let id = s.effective_context;
        s.done.push(id);
        OK
    })?;
    linker.func_wrap(
        env,
        "proxy_call_foreign_function",
        |mut c: C<'_>, np: i32, nl: i32, ap: i32, al: i32, ret_ptr: i32, ret_size: i32| -> R {
            // Name and arguments read in place (the retry filter calls two per request).
            let Some((data, s)) = memory_and_state(&mut c) else { return st(Status::BadArgument) };
            let (Some(name), Some(args)) = (slice(data, np, nl), slice(data, ap, al)) else {
                return st(Status::BadArgument);
            };
            let name = String::from_utf8_lossy(name);
            // The embedder's functions first: one of the same name replaces a built-in one.
            let result = if let Some(f) = s.foreign.get(name.as_ref()) {
                f(args)
            } else if name == "trellis.shared_add" {
                shared_add(s, args).map(|next| {
                    let mut out = std::mem::take(&mut s.scratch);
                    out.clear();
                    out.extend_from_slice(&next.to_le_bytes());
                    out
                })
            } else {
                return st(stream_function(s, &name, args).unwrap_or(Status::NotFound));
            };
            match result {
                Ok(result) => give_scratch(&mut c, result, ret_ptr, ret_size),
                Err(s) => st(s),
            }
        },
    )?;
    linker.func_wrap(env, "proxy_define_metric", |mut c: C<'_>, kind: i32, np: i32, nl: i32, ret: i32| -> R {
        let Some(kind) = MetricType::from_i32(kind) else { return st(Status::BadArgument) };
        let Some(name) = read_str(&mut c, np, nl) else { return st(Status::BadArgument) };
        let id = c.data().metrics.define(kind, &name);
        st(if write_u32(&mut c, ret, id) { Status::Ok } else { Status::BadArgument })
    })?;
    linker.func_wrap(env, "proxy_increment_metric", |c: C<'_>, id: i32, offset: i64| -> R {
        let mut values = c.data().metrics.values.lock().unwrap_or_else(|p| p.into_inner());
        let Some(m) = values.get_mut(id as u32 as usize) else { return st(Status::NotFound) };
        if m.1 == MetricType::Histogram {
            return st(Status::BadArgument);
        }
        m.2 = m.2.saturating_add(offset);
        OK
    })?;
    linker.func_wrap(env, "proxy_record_metric", |c: C<'_>, id: i32, value: i64| -> R {
        let mut values = c.data().metrics.values.lock().unwrap_or_else(|p| p.into_inner());
        let Some(m) = values.get_mut(id as u32 as usize) else { return st(Status::NotFound) };
        // Gauges take the value; histograms keep the last observation (and the embedder exports them).
        m.2 = value;
        OK
    })?;
    linker.func_wrap(env, "proxy_get_metric", |mut c: C<'_>, id: i32, ret: i32| -> R {
        let value =
            c.data().metrics.values.lock().unwrap_or_else(|p| p.into_inner()).get(id as u32 as usize).map(|m| m.2);
        match value {
            Some(v) => st(if write(&mut c, ret, &(v as u64).to_le_bytes()) { Status::Ok } else { Status::BadArgument }),
            None => st(Status::NotFound),
        }
    })?;
    wasi(linker)
}

/// WASI preview 1, as far as proxy-wasm modules use it: stdout / stderr become logs; no
/// files, arguments or environment; clocks and randomness work; exiting traps.
fn wasi(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    const W: &str = "wasi_snapshot_preview1";
    const ESUCCESS: i32 = 0;
    const EBADF: i32 = 8;
    const EINVAL: i32 = 28;
    const ENOTSUP: i32 = 58;
    linker.func_wrap(W, "fd_write", |mut c: C<'_>, fd: i32, iovs: i32, n: i32, ret: i32| -> R {
        if fd != 1 && fd != 2 {
            return Ok(EBADF);
        }
        let mut out = Vec::new();
        for i in 0..n.max(0) {
            let Some(iov) = read(&mut c, iovs.wrapping_add(i * 8), 8) else { return Ok(EINVAL) };
            let ptr = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
            let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
            let Some(b) = read(&mut c, ptr, len) else { return Ok(EINVAL) };
            out.extend_from_slice(&b);
            if out.len() > 64 * 1024 {
                break;
            }
        }
        let written = out.len() as u32;
        let text = String::from_utf8_lossy(&out).trim_end().to_string();
        if !text.is_empty() {
            c.data_mut().log(if fd == 2 { LogLevel::Error } else { LogLevel::Info }, text);
        }
        Ok(if write_u32(&mut c, ret, written) { ESUCCESS } else { EINVAL })
    })?;
    linker.func_wrap(W, "fd_read", |_c: C<'_>, _fd: i32, _iovs: i32, _n: i32, _ret: i32| -> R { Ok(EBADF) })?;
    linker.func_wrap(W, "fd_close", |_c: C<'_>, _fd: i32| -> R { Ok(EBADF) })?;
    linker.func_wrap(W, "fd_seek", |_c: C<'_>, _fd: i32, _off: i64, _whence: i32, _ret: i32| -> R { Ok(EBADF) })?;
    linker.func_wrap(W, "fd_fdstat_get", |_c: C<'_>, _fd: i32, _ret: i32| -> R { Ok(EBADF) })?;
    linker.func_wrap(W, "fd_prestat_get", |_c: C<'_>, _fd: i32, _ret: i32| -> R { Ok(EBADF) })?;
    linker.func_wrap(W, "fd_prestat_dir_name", |_c: C<'_>, _fd: i32, _p: i32, _l: i32| -> R { Ok(EBADF) })?;
    for (name, _) in [("environ_sizes_get", 0), ("args_sizes_get", 1)] {
        linker.func_wrap(W, name, |mut c: C<'_>, count: i32, size: i32| -> R {
            Ok(if write_u32(&mut c, count, 0) && write_u32(&mut c, size, 0) { ESUCCESS } else { EINVAL })
        })?;
    }
    for name in ["environ_get", "args_get"] {
        linker.func_wrap(W, name, |_c: C<'_>, _a: i32, _b: i32| -> R { Ok(ESUCCESS) })?;
    }
    linker.func_wrap(W, "clock_time_get", |mut c: C<'_>, _id: i32, _precision: i64, ret: i32| -> R {
        Ok(if write(&mut c, ret, &now_nanos().to_le_bytes()) { ESUCCESS } else { EINVAL })
    })?;
    linker.func_wrap(W, "clock_res_get", |mut c: C<'_>, _id: i32, ret: i32| -> R {
        Ok(if write(&mut c, ret, &1u64.to_le_bytes()) { ESUCCESS } else { EINVAL })
    })?;
    linker.func_wrap(W, "random_get", |mut c: C<'_>, ptr: i32, len: i32| -> R {
        let mut buf = vec![0u8; len.max(0) as usize];
        for (i, b) in buf.iter_mut().enumerate() {
            // SplitMix64 seeded from the clock: filters use this for sampling, not secrets.
            let mut z = now_nanos().wrapping_add((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            *b = (z ^ (z >> 31)) as u8;
        }
        Ok(if write(&mut c, ptr, &buf) { ESUCCESS } else { EINVAL })
    })?;
    linker.func_wrap(W, "sched_yield", |_c: C<'_>| -> R { Ok(ESUCCESS) })?;
    linker.func_wrap(W, "poll_oneoff", |_c: C<'_>, _a: i32, _b: i32, _n: i32, _r: i32| -> R { Ok(ENOTSUP) })?;
    linker.func_wrap(W, "proc_exit", |_c: C<'_>, code: i32| -> wasmtime::Result<()> {
        Err(wasmtime::Error::msg(format!("the module called proc_exit({code})")))
    })?;
    Ok(())
}
