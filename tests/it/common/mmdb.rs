//! A small MaxMind DB file writer (the format of GeoLite2: a binary search tree over the
//! address bits, a data section, a metadata map; maxmind.github.io/MaxMind-DB), so tests
//! build the databases they read instead of shipping MaxMind's.

use std::collections::BTreeMap;

/// A value of the data section.
#[derive(Clone, Debug)]
pub enum Value {
    Str(String),
    U32(u32),
    U16(u16),
    Map(Vec<(String, Value)>),
    Array(Vec<Value>),
}

pub fn s(v: &str) -> Value {
    Value::Str(v.to_string())
}

pub fn map(pairs: &[(&str, Value)]) -> Value {
    Value::Map(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    )
}

fn control(out: &mut Vec<u8>, kind: u8, size: usize) {
    assert!(size < 285, "sizes past 284 are not needed here");
    let (low, extra) = if size < 29 {
        (size as u8, None)
    } else {
        (29, Some((size - 29) as u8))
    };
    if kind <= 7 {
        out.push((kind << 5) | low);
    } else {
        out.push(low);
        out.push(kind - 7);
    }
    out.extend(extra);
}

fn encode(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Str(t) => {
            control(out, 2, t.len());
            out.extend_from_slice(t.as_bytes());
        }
        Value::U16(n) => {
            let b = n.to_be_bytes();
            let skip = b.iter().take_while(|&&x| x == 0).count();
            control(out, 5, 2 - skip);
            out.extend_from_slice(&b[skip..]);
        }
        Value::U32(n) => {
            let b = n.to_be_bytes();
            let skip = b.iter().take_while(|&&x| x == 0).count();
            control(out, 6, 4 - skip);
            out.extend_from_slice(&b[skip..]);
        }
        Value::Map(pairs) => {
            control(out, 7, pairs.len());
            for (k, v) in pairs {
                encode(out, &Value::Str(k.clone()));
                encode(out, v);
            }
        }
        Value::Array(items) => {
            control(out, 11, items.len());
            for v in items {
                encode(out, v);
            }
        }
    }
}

/// An IPv4 database of `kind` (`GeoLite2-ASN`, ...) mapping each `a.b.c.d/len` to a value.
pub fn ipv4_database(kind: &str, networks: &[(&str, Value)]) -> Vec<u8> {
    // The data section: one record per network.
    let mut data = Vec::new();
    let mut at = Vec::new();
    for (_, v) in networks {
        at.push(data.len() as u32);
        encode(&mut data, v);
    }
    // The tree: node 0 is the root; a record is a node index, or a value.
    #[derive(Clone, Copy)]
    enum Rec {
        Empty,
        Node(u32),
        Data(u32),
    }
    let mut nodes: Vec<[Rec; 2]> = vec![[Rec::Empty, Rec::Empty]];
    for (i, (net, _)) in networks.iter().enumerate() {
        let (ip, len) = net.split_once('/').unwrap();
        let ip: u32 = u32::from(ip.parse::<std::net::Ipv4Addr>().unwrap());
        let len: u32 = len.parse().unwrap();
        let mut node = 0usize;
        for depth in 0..len {
            let bit = ((ip >> (31 - depth)) & 1) as usize;
            if depth + 1 == len {
                nodes[node][bit] = Rec::Data(at[i]);
            } else {
                node = match nodes[node][bit] {
                    Rec::Node(n) => n as usize,
                    _ => {
                        nodes.push([Rec::Empty, Rec::Empty]);
                        let n = nodes.len() - 1;
                        nodes[node][bit] = Rec::Node(n as u32);
                        n
                    }
                };
            }
        }
    }
    let count = nodes.len() as u32;
    let mut out = Vec::new();
    for n in &nodes {
        for r in n {
            let v = match *r {
                Rec::Empty => count,
                Rec::Node(i) => i,
                Rec::Data(off) => count + 16 + off,
            };
            out.extend_from_slice(&v.to_be_bytes()[1..]);
        }
    }
    out.extend_from_slice(&[0u8; 16]);
    out.extend_from_slice(&data);
    out.extend_from_slice(b"\xAB\xCD\xEFMaxMind.com");
    let mut meta = BTreeMap::new();
    meta.insert("binary_format_major_version", Value::U16(2));
    meta.insert("binary_format_minor_version", Value::U16(0));
    meta.insert("build_epoch", Value::U32(1_795_000_000));
    meta.insert("database_type", s(kind));
    meta.insert("description", map(&[("en", s("wsedge test database"))]));
    meta.insert("ip_version", Value::U16(4));
    meta.insert("languages", Value::Array(vec![s("en")]));
    meta.insert("node_count", Value::U32(count));
    meta.insert("record_size", Value::U16(24));
    let meta = Value::Map(meta.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
    encode(&mut out, &meta);
    out
}
