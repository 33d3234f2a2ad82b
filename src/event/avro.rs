//! Avro binary decoding of auth events, straight from the bytes.
//!
//! A writer schema is compiled once into a [`ReadPlan`]: for each writer
//! field, in writer order, either a typed read into one [`AuthEvent`] field
//! or a skip of a value of the writer's type. This follows Avro schema
//! resolution against our reader schema (`schemas/auth_event.avsc`).
//! Decoding then walks the plan over the bytes without building the generic
//! `apache_avro::types::Value` tree: building that tree alone costs more
//! than twice our whole decode, before any conversion to an `AuthEvent`.
//!
//! `apache_avro` is used only to parse schemas.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::OnceLock;

use apache_avro::Schema;
use apache_avro::schema::{
    DecimalSchema, InnerDecimalSchema, Name, NamesRef, RecordSchema, ResolvedSchema, SchemaKind, UuidSchema,
};
use uuid::Uuid;

use super::{AuthEvent, DecodeError, Violation};

/// Our (reader) schema, also what [`encode_body`] writes.
pub const AUTH_EVENT_SCHEMA: &str = include_str!("../../schemas/auth_event.avsc");

/// First byte of the Confluent wire format, followed by a 4-byte big-endian
/// schema id.
pub const CONFLUENT_MAGIC: u8 = 0x00;
/// First two bytes of Avro single-object encoding, followed by the 8-byte
/// little-endian CRC-64-AVRO fingerprint of the writer schema.
pub const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];

/// Nesting limit for skipped values: a recursive writer type (a linked list
/// of records, say) must not let a message exhaust the stack.
const MAX_DEPTH: u32 = 128;

/// CRC-64-AVRO (Rabin) fingerprint of a schema's Parsing Canonical Form, as
/// used by single-object encoding.
pub fn schema_fingerprint(schema: &Schema) -> u64 {
    crc64_avro(canonical_form(schema).as_bytes())
}

/// Parsing Canonical Form, as the Avro specification defines it.
///
/// Not `Schema::canonical_form`: apache-avro 0.22 keeps a primitive with a
/// logical type as an object (`{"type":"long"}` for timestamp-micros) and
/// keeps decimal precision and scale, so its fingerprints differ from those
/// of the Java and Python implementations for our very schema.
pub fn canonical_form(schema: &Schema) -> String {
    let mut out = String::new();
    write_canonical(schema, &mut HashSet::new(), &mut out);
    out
}

fn write_canonical(schema: &Schema, defined: &mut HashSet<String>, out: &mut String) {
    let primitive = match schema {
        Schema::Null => "null",
        Schema::Boolean => "boolean",
        Schema::Int | Schema::Date | Schema::TimeMillis => "int",
        Schema::Long
        | Schema::TimeMicros
        | Schema::TimestampMillis
        | Schema::TimestampMicros
        | Schema::TimestampNanos
        | Schema::LocalTimestampMillis
        | Schema::LocalTimestampMicros
        | Schema::LocalTimestampNanos => "long",
        Schema::Float => "float",
        Schema::Double => "double",
        Schema::Bytes
        | Schema::BigDecimal
        | Schema::Uuid(UuidSchema::Bytes)
        | Schema::Decimal(DecimalSchema { inner: InnerDecimalSchema::Bytes, .. }) => "bytes",
        Schema::String | Schema::Uuid(UuidSchema::String) => "string",
        Schema::Ref { name } => return out.push_str(&format!("\"{}\"", name.fullname(None))),
        Schema::Array(array) => {
            out.push_str(r#"{"type":"array","items":"#);
            write_canonical(&array.items, defined, out);
            return out.push('}');
        }
        Schema::Map(map) => {
            out.push_str(r#"{"type":"map","values":"#);
            write_canonical(&map.types, defined, out);
            return out.push('}');
        }
        Schema::Union(union) => {
            out.push('[');
            for (i, variant) in union.variants().iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(variant, defined, out);
            }
            return out.push(']');
        }
        Schema::Record(record) => {
            if write_name(&record.name, "record", defined, out) {
                out.push_str(r#","fields":["#);
                for (i, field) in record.fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&format!(r#"{{"name":"{}","type":"#, field.name));
                    write_canonical(&field.schema, defined, out);
                    out.push('}');
                }
                out.push_str("]}");
            }
            return;
        }
        Schema::Enum(e) => {
            if write_name(&e.name, "enum", defined, out) {
                let symbols: Vec<String> = e.symbols.iter().map(|s| format!("\"{s}\"")).collect();
                out.push_str(&format!(r#","symbols":[{}]}}"#, symbols.join(",")));
            }
            return;
        }
        Schema::Fixed(fixed)
        | Schema::Uuid(UuidSchema::Fixed(fixed))
        | Schema::Duration(fixed)
        | Schema::Decimal(DecimalSchema { inner: InnerDecimalSchema::Fixed(fixed), .. }) => {
            if write_name(&fixed.name, "fixed", defined, out) {
                out.push_str(&format!(r#","size":{}}}"#, fixed.size));
            }
            return;
        }
    };
    out.push('"');
    out.push_str(primitive);
    out.push('"');
}

/// Writes the start of a named type's definition, or just its name if it
/// was defined earlier; returns whether the definition must be completed.
fn write_name(name: &Name, kind: &str, defined: &mut HashSet<String>, out: &mut String) -> bool {
    let fullname = name.fullname(None);
    if defined.contains(&fullname) {
        out.push_str(&format!("\"{fullname}\""));
        return false;
    }
    out.push_str(&format!(r#"{{"name":"{fullname}","type":"{kind}""#));
    defined.insert(fullname);
    true
}

/// The 64-bit Rabin fingerprint of the Avro specification.
fn crc64_avro(bytes: &[u8]) -> u64 {
    const EMPTY: u64 = 0xc15d_213a_a4d7_a795;
    const TABLE: [u64; 256] = {
        let mut table = [0u64; 256];
        let mut i = 0;
        while i < 256 {
            let mut fp = i as u64;
            let mut bit = 0;
            while bit < 8 {
                fp = (fp >> 1) ^ (EMPTY & (fp & 1).wrapping_neg());
                bit += 1;
            }
            table[i] = fp;
            i += 1;
        }
        table
    };
    bytes.iter().fold(EMPTY, |fp, &b| (fp >> 8) ^ TABLE[((fp ^ u64::from(b)) & 0xff) as usize])
}

/// The fingerprints under which producers may announce `schema`: the one
/// the specification defines and, where it differs, the one apache-avro
/// 0.22 writers compute from their own canonical form (see
/// [`canonical_form`]), so that both Java and Rust producers are understood.
pub fn schema_fingerprints(schema: &Schema) -> Vec<u64> {
    let mut fingerprints = vec![schema_fingerprint(schema)];
    let theirs = crc64_avro(schema.canonical_form().as_bytes());
    if theirs != fingerprints[0] {
        fingerprints.push(theirs);
    }
    fingerprints
}

/// Fingerprint of [`AUTH_EVENT_SCHEMA`] per the specification.
pub fn auth_event_fingerprint() -> u64 {
    static FINGERPRINT: OnceLock<u64> = OnceLock::new();
    *FINGERPRINT.get_or_init(|| {
        let schema = Schema::parse_str(AUTH_EVENT_SCHEMA).expect("built-in schema is valid");
        schema_fingerprint(&schema)
    })
}

/// Confluent wire format: magic byte, big-endian schema id, Avro body.
pub fn confluent_frame(schema_id: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(CONFLUENT_MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Single-object encoding: magic, little-endian fingerprint, Avro body.
pub fn single_object_frame(fingerprint: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + body.len());
    out.extend_from_slice(&SINGLE_OBJECT_MAGIC);
    out.extend_from_slice(&fingerprint.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Splits a Confluent-framed message into schema id and body.
pub fn split_confluent(payload: &[u8]) -> Result<(u32, &[u8]), DecodeError> {
    match payload.split_first_chunk::<5>() {
        Some(([CONFLUENT_MAGIC, id @ ..], body)) => Ok((u32::from_be_bytes(*id), body)),
        Some(_) => Err(DecodeError::Avro("no Confluent magic byte".to_owned())),
        None => Err(DecodeError::Avro(format!("Confluent header truncated: {} of 5 bytes", payload.len()))),
    }
}

/// Splits a single-object-encoded message into fingerprint and body.
pub fn split_single_object(payload: &[u8]) -> Result<(u64, &[u8]), DecodeError> {
    match payload.split_first_chunk::<10>() {
        Some(([0xC3, 0x01, fingerprint @ ..], body)) => Ok((u64::from_le_bytes(*fingerprint), body)),
        Some(_) => Err(DecodeError::Avro("no single-object magic bytes".to_owned())),
        None => Err(DecodeError::Avro(format!("single-object header truncated: {} of 10 bytes", payload.len()))),
    }
}

/// Writes `event` as an Avro body with [`AUTH_EVENT_SCHEMA`] (no framing).
pub fn encode_body(event: &AuthEvent) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_bytes(&mut out, event.event_id.hyphenated().encode_lower(&mut Uuid::encode_buffer()).as_bytes());
    write_long(&mut out, event.occurred_at);
    write_bytes(&mut out, event.action.as_bytes());
    write_optional(&mut out, event.user_id.as_deref());
    write_optional(&mut out, event.username.as_deref());
    write_optional(&mut out, event.ip_address.map(|ip| ip.to_string()).as_deref());
    write_optional(&mut out, event.user_agent.as_deref());
    write_optional(&mut out, event.session_id.as_deref());
    write_optional(&mut out, event.request_id.as_deref());
    if !event.metadata.is_empty() {
        write_long(&mut out, event.metadata.len() as i64);
        for (key, value) in &event.metadata {
            write_bytes(&mut out, key.as_bytes());
            write_bytes(&mut out, value.as_bytes());
        }
    }
    write_long(&mut out, 0);
    out
}

/// Zigzag varint, as Avro writes `int` and `long`.
pub(crate) fn write_long(out: &mut Vec<u8>, value: i64) {
    let mut n = ((value << 1) ^ (value >> 63)) as u64;
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

pub(crate) fn write_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    write_long(out, bytes.len() as i64);
    out.extend_from_slice(bytes);
}

/// A `["null", "string"]` union value.
fn write_optional(out: &mut Vec<u8>, text: Option<&str>) {
    match text {
        None => write_long(out, 0),
        Some(text) => {
            write_long(out, 1);
            write_bytes(out, text.as_bytes());
        }
    }
}

/// The fields of our reader schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    EventId,
    OccurredAt,
    Action,
    UserId,
    Username,
    IpAddress,
    UserAgent,
    SessionId,
    RequestId,
    Metadata,
}

impl Target {
    const ALL: [Target; 10] = [
        Target::EventId,
        Target::OccurredAt,
        Target::Action,
        Target::UserId,
        Target::Username,
        Target::IpAddress,
        Target::UserAgent,
        Target::SessionId,
        Target::RequestId,
        Target::Metadata,
    ];

    fn name(self) -> &'static str {
        match self {
            Target::EventId => "event_id",
            Target::OccurredAt => "occurred_at",
            Target::Action => "action",
            Target::UserId => "user_id",
            Target::Username => "username",
            Target::IpAddress => "ip_address",
            Target::UserAgent => "user_agent",
            Target::SessionId => "session_id",
            Target::RequestId => "request_id",
            Target::Metadata => "metadata",
        }
    }

    fn from_name(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Fields without a default in our schema.
    fn required(self) -> bool {
        matches!(self, Target::EventId | Target::OccurredAt | Target::Action)
    }

    /// The writer types we can read into this field, for error messages.
    fn readable_from(self) -> &'static str {
        match self {
            Target::EventId => "string, bytes or uuid fixed(16)",
            Target::OccurredAt => "long, timestamp-micros or timestamp-millis",
            Target::UserId => "string, bytes, int or long",
            Target::Metadata => "map of string",
            _ => "string or bytes",
        }
    }
}

/// The optional text fields, stored by index while decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TextSlot {
    UserId,
    Username,
    UserAgent,
    SessionId,
    RequestId,
}

/// How one writer value becomes part of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// A string (or bytes) holding a UUID in text form.
    EventIdText,
    /// A `fixed(16)` holding the 16 UUID bytes.
    EventIdFixed,
    OccurredAtMicros,
    OccurredAtMillis,
    Action,
    Text(TextSlot),
    /// An `int` or `long` user id, kept as decimal text.
    UserIdNumber,
    IpAddress,
    Metadata,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Branch {
    Null,
    Read(Op),
    /// A union branch whose type cannot be read into the field; only an
    /// error if a message actually uses it (Avro resolution rules).
    Unreadable,
}

#[derive(Debug)]
enum Read {
    Plain(Op),
    Union(Box<[Branch]>),
}

/// How to step over a writer value we do not read.
#[derive(Debug)]
enum Skip {
    /// `null` is `Fixed(0)`, `boolean` is `Fixed(1)`, `float` is `Fixed(4)`...
    Fixed(usize),
    Varint,
    Bytes,
    Enum {
        symbols: usize,
    },
    Array(Box<Skip>),
    Map(Box<Skip>),
    Union(Box<[Skip]>),
    Record(Box<[Skip]>),
    /// A record definition in [`ReadPlan::records`]; records go through this
    /// table because a record type may contain itself.
    Named(usize),
}

#[derive(Debug)]
enum Step {
    Read { target: Target, read: Read },
    Skip(Skip),
}

/// A writer schema compiled for reading auth events. Cheap to share
/// (`Arc<ReadPlan>`) and immutable.
#[derive(Debug)]
pub struct ReadPlan {
    /// Full name of the writer record, for error messages.
    writer_name: String,
    steps: Box<[Step]>,
    records: Box<[Skip]>,
}

fn incompatible(schema: &str, reason: impl Into<String>) -> DecodeError {
    DecodeError::IncompatibleSchema(schema.to_owned(), reason.into())
}

impl ReadPlan {
    /// Resolves `writer` against our reader schema. Fails if a value the
    /// writer may send can never be read (a required field is missing, or
    /// has a type we cannot read).
    pub fn compile(writer: &Schema) -> Result<ReadPlan, DecodeError> {
        let Schema::Record(record) = writer else {
            return Err(incompatible(
                "(top level)",
                format!("top-level type is {:?}, not a record", SchemaKind::from(writer)),
            ));
        };
        let writer_name = record.name.fullname(None);
        let resolved = ResolvedSchema::try_from(writer).map_err(|e| incompatible(&writer_name, e.to_string()))?;
        let mut compiler = Compiler { names: resolved.get_names(), record_index: HashMap::new(), records: Vec::new() };

        let mut steps = Vec::with_capacity(record.fields.len());
        let mut present = Vec::new();
        for field in &record.fields {
            let step = match Target::from_name(&field.name) {
                Some(target) => {
                    present.push(target);
                    compiler.read(target, &field.schema)
                }
                None => compiler.skip(&field.schema).map(|skip| Some(Step::Skip(skip))),
            };
            steps.extend(step.map_err(|reason| incompatible(&writer_name, reason))?);
        }
        if let Some(missing) = Target::ALL.into_iter().find(|t| t.required() && !present.contains(t)) {
            return Err(incompatible(&writer_name, format!("the writer schema has no field `{}`", missing.name())));
        }

        Ok(ReadPlan { writer_name, steps: steps.into(), records: compiler.records.into() })
    }

    /// Decodes one Avro body (without framing) written with this plan's
    /// writer schema. All input must be consumed.
    pub fn decode(&self, body: &[u8]) -> Result<AuthEvent, DecodeError> {
        let mut input = Cursor { buf: body, pos: 0 };
        let mut event = Partial::default();
        for step in &self.steps {
            match step {
                Step::Read { target, read } => {
                    let op = match read {
                        Read::Plain(op) => *op,
                        Read::Union(branches) => {
                            let index = input.long()?;
                            match usize::try_from(index).ok().and_then(|i| branches.get(i)) {
                                Some(Branch::Read(op)) => *op,
                                Some(Branch::Null) => continue,
                                Some(Branch::Unreadable) => {
                                    return Err(incompatible(
                                        &self.writer_name,
                                        format!(
                                            "`{}` uses union branch {index}, which cannot be read as {}",
                                            target.name(),
                                            target.readable_from()
                                        ),
                                    ));
                                }
                                None => {
                                    return Err(input
                                        .error(format!("union branch {index} of `{}` does not exist", target.name())));
                                }
                            }
                        }
                    };
                    event.read(&mut input, op)?;
                }
                Step::Skip(skip) => self.skip(&mut input, skip, 0)?,
            }
        }
        if input.remaining() > 0 {
            return Err(DecodeError::Avro(format!("{} trailing bytes after the record", input.remaining())));
        }
        event.finish()
    }

    fn skip(&self, input: &mut Cursor<'_>, skip: &Skip, depth: u32) -> Result<(), DecodeError> {
        if depth > MAX_DEPTH {
            return Err(input.error(format!("values nested deeper than {MAX_DEPTH} levels")));
        }
        match skip {
            Skip::Fixed(size) => {
                input.take(*size)?;
            }
            Skip::Varint => {
                input.long()?;
            }
            Skip::Bytes => {
                input.bytes()?;
            }
            Skip::Enum { symbols } => {
                let index = input.long()?;
                if !usize::try_from(index).is_ok_and(|i| i < *symbols) {
                    return Err(input.error(format!("enum index {index} out of range")));
                }
            }
            Skip::Array(item) => {
                skip_blocks(input, |input| self.skip(input, item, depth + 1))?;
            }
            Skip::Map(value) => {
                skip_blocks(input, |input| {
                    input.bytes()?;
                    self.skip(input, value, depth + 1)
                })?;
            }
            Skip::Union(branches) => {
                let index = input.long()?;
                let Some(branch) = usize::try_from(index).ok().and_then(|i| branches.get(i)) else {
                    return Err(input.error(format!("union branch {index} does not exist")));
                };
                self.skip(input, branch, depth + 1)?;
            }
            Skip::Record(fields) => {
                for field in fields {
                    self.skip(input, field, depth + 1)?;
                }
            }
            Skip::Named(index) => self.skip(input, &self.records[*index], depth)?,
        }
        Ok(())
    }
}

/// Steps over the blocks of an array or map.
fn skip_blocks(
    input: &mut Cursor<'_>,
    mut item: impl FnMut(&mut Cursor<'_>) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    loop {
        let count = input.long()?;
        if count == 0 {
            return Ok(());
        }
        if count < 0 {
            // A negative count is followed by the block's size in bytes.
            let size = input.len()?;
            input.take(size)?;
            continue;
        }
        for _ in 0..count {
            let start = input.pos;
            item(input)?;
            if input.pos == start {
                // Zero-width items (null, empty records): the rest of the
                // block is empty too; don't spin on a huge count.
                break;
            }
        }
    }
}

/// Compiles writer types; holds the names needed to follow references.
struct Compiler<'s> {
    names: &'s NamesRef<'s>,
    record_index: HashMap<Name, usize>,
    records: Vec<Skip>,
}

impl<'s> Compiler<'s> {
    fn resolve<'x>(&self, schema: &'x Schema) -> Result<&'x Schema, String>
    where
        's: 'x,
    {
        match schema {
            Schema::Ref { name } => self
                .names
                .get(name)
                .copied()
                .ok_or_else(|| format!("unresolved type reference {}", name.fullname(None))),
            other => Ok(other),
        }
    }

    /// The step reading a writer field into `target`; `None` if the writer
    /// field is always null (so the optional field stays empty).
    fn read(&mut self, target: Target, writer: &Schema) -> Result<Option<Step>, String> {
        let cannot_read = |writer: &Schema| {
            format!(
                "`{}` has writer type {:?}, expected {}",
                target.name(),
                SchemaKind::from(writer),
                target.readable_from()
            )
        };
        let writer = self.resolve(writer)?;
        let read = match writer {
            Schema::Null if target.required() => return Err(cannot_read(writer)),
            Schema::Null => return Ok(None),
            Schema::Union(union) => {
                let branches = union
                    .variants()
                    .iter()
                    .map(|variant| {
                        Ok(match self.resolve(variant)? {
                            Schema::Null => Branch::Null,
                            other => op_for(target, other).map_or(Branch::Unreadable, Branch::Read),
                        })
                    })
                    .collect::<Result<Box<[Branch]>, String>>()?;
                if !branches.iter().any(|b| matches!(b, Branch::Read(_))) {
                    return Err(format!(
                        "no branch of the writer union of `{}` is {}",
                        target.name(),
                        target.readable_from()
                    ));
                }
                Read::Union(branches)
            }
            other => Read::Plain(op_for(target, other).ok_or_else(|| cannot_read(other))?),
        };
        Ok(Some(Step::Read { target, read }))
    }

    fn skip(&mut self, writer: &Schema) -> Result<Skip, String> {
        Ok(match writer {
            Schema::Null => Skip::Fixed(0),
            Schema::Boolean => Skip::Fixed(1),
            Schema::Float => Skip::Fixed(4),
            Schema::Double => Skip::Fixed(8),
            Schema::Int
            | Schema::Long
            | Schema::Date
            | Schema::TimeMillis
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => Skip::Varint,
            Schema::Bytes
            | Schema::String
            | Schema::BigDecimal
            | Schema::Uuid(UuidSchema::String | UuidSchema::Bytes)
            | Schema::Decimal(DecimalSchema { inner: InnerDecimalSchema::Bytes, .. }) => Skip::Bytes,
            Schema::Fixed(fixed)
            | Schema::Uuid(UuidSchema::Fixed(fixed))
            | Schema::Duration(fixed)
            | Schema::Decimal(DecimalSchema { inner: InnerDecimalSchema::Fixed(fixed), .. }) => Skip::Fixed(fixed.size),
            Schema::Enum(e) => Skip::Enum { symbols: e.symbols.len() },
            Schema::Array(array) => Skip::Array(Box::new(self.skip(&array.items)?)),
            Schema::Map(map) => Skip::Map(Box::new(self.skip(&map.types)?)),
            Schema::Union(union) => {
                Skip::Union(union.variants().iter().map(|variant| self.skip(variant)).collect::<Result<_, _>>()?)
            }
            Schema::Record(record) => self.record(record)?,
            Schema::Ref { name } => match self.record_index.get(name) {
                Some(&index) => Skip::Named(index),
                None => {
                    let definition = self.resolve(writer)?;
                    self.skip(definition)?
                }
            },
        })
    }

    fn record(&mut self, record: &RecordSchema) -> Result<Skip, String> {
        if let Some(&index) = self.record_index.get(&record.name) {
            return Ok(Skip::Named(index));
        }
        let index = self.records.len();
        // Registered before its fields so that a self-reference finds it.
        self.records.push(Skip::Fixed(0));
        self.record_index.insert(record.name.clone(), index);
        let fields = record.fields.iter().map(|field| self.skip(&field.schema)).collect::<Result<_, _>>()?;
        self.records[index] = Skip::Record(fields);
        Ok(Skip::Named(index))
    }
}

/// The typed read for a (non-union, non-null) writer type, if any.
fn op_for(target: Target, writer: &Schema) -> Option<Op> {
    // Avro promotes bytes to string; a uuid-annotated string is a string.
    let is_text = |s: &Schema| matches!(s, Schema::String | Schema::Bytes | Schema::Uuid(UuidSchema::String));
    let text = is_text(writer);
    match target {
        Target::EventId => match writer {
            Schema::Uuid(UuidSchema::Fixed(_)) => Some(Op::EventIdFixed),
            _ => text.then_some(Op::EventIdText),
        },
        Target::OccurredAt => match writer {
            Schema::Long | Schema::TimestampMicros => Some(Op::OccurredAtMicros),
            Schema::TimestampMillis => Some(Op::OccurredAtMillis),
            _ => None,
        },
        Target::Action => text.then_some(Op::Action),
        Target::UserId => match writer {
            Schema::Int | Schema::Long => Some(Op::UserIdNumber),
            _ => text.then_some(Op::Text(TextSlot::UserId)),
        },
        Target::Username => text.then_some(Op::Text(TextSlot::Username)),
        Target::IpAddress => text.then_some(Op::IpAddress),
        Target::UserAgent => text.then_some(Op::Text(TextSlot::UserAgent)),
        Target::SessionId => text.then_some(Op::Text(TextSlot::SessionId)),
        Target::RequestId => text.then_some(Op::Text(TextSlot::RequestId)),
        Target::Metadata => match writer {
            Schema::Map(map) if is_text(&map.types) => Some(Op::Metadata),
            _ => None,
        },
    }
}

/// An event under construction.
#[derive(Default)]
struct Partial {
    event_id: Option<Uuid>,
    occurred_at: Option<i64>,
    action: Option<String>,
    text: [Option<String>; 5],
    ip_address: Option<IpAddr>,
    metadata: Vec<(String, String)>,
}

impl Partial {
    fn read(&mut self, input: &mut Cursor<'_>, op: Op) -> Result<(), DecodeError> {
        match op {
            Op::EventIdText => {
                let text = input.str("event_id")?;
                self.event_id = Some(Uuid::parse_str(text).map_err(|_| Violation::InvalidUuid)?);
            }
            Op::EventIdFixed => self.event_id = Some(Uuid::from_bytes(input.array()?)),
            Op::OccurredAtMicros => self.occurred_at = Some(input.long()?),
            // Saturating: an absurd value still fails validation as too old
            // or too far in the future instead of wrapping around.
            Op::OccurredAtMillis => self.occurred_at = Some(input.long()?.saturating_mul(1000)),
            Op::Action => self.action = Some(input.str("action")?.to_owned()),
            Op::Text(slot) => {
                let field = match slot {
                    TextSlot::UserId => "user_id",
                    TextSlot::Username => "username",
                    TextSlot::UserAgent => "user_agent",
                    TextSlot::SessionId => "session_id",
                    TextSlot::RequestId => "request_id",
                };
                let text = input.str(field)?;
                self.text[slot as usize] = (!text.is_empty()).then(|| text.to_owned());
            }
            Op::UserIdNumber => {
                self.text[TextSlot::UserId as usize] = Some(input.long()?.to_string());
            }
            Op::IpAddress => {
                let text = input.str("ip_address")?;
                self.ip_address = match text {
                    "" => None,
                    text => Some(text.parse().map_err(|_| Violation::InvalidIp)?),
                };
            }
            Op::Metadata => self.read_metadata(input)?,
        }
        Ok(())
    }

    fn read_metadata(&mut self, input: &mut Cursor<'_>) -> Result<(), DecodeError> {
        loop {
            let count = input.long()?;
            if count == 0 {
                return Ok(());
            }
            if count < 0 {
                input.len()?;
            }
            // Each entry takes at least two bytes (two lengths); checking
            // this first bounds the allocation by the input size.
            let count = usize::try_from(count.unsigned_abs()).unwrap_or(usize::MAX);
            if count > input.remaining() / 2 {
                return Err(input.error(format!("map block of {count} entries exceeds the input")));
            }
            self.metadata.reserve(count);
            for _ in 0..count {
                let key = input.str("metadata")?;
                let value = input.str("metadata")?;
                self.metadata.push((key.to_owned(), value.to_owned()));
            }
        }
    }

    fn finish(self) -> Result<AuthEvent, DecodeError> {
        let [user_id, username, user_agent, session_id, request_id] = self.text;
        Ok(AuthEvent {
            event_id: self.event_id.ok_or(Violation::MissingField("event_id"))?,
            occurred_at: self.occurred_at.ok_or(Violation::MissingField("occurred_at"))?,
            action: self.action.ok_or(Violation::MissingField("action"))?,
            user_id,
            username,
            ip_address: self.ip_address,
            user_agent,
            session_id,
            request_id,
            metadata: self.metadata,
        })
    }
}

/// Reading position in an Avro body. Every length is checked against the
/// remaining input before use, so a hostile length cannot cause a large
/// allocation.
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Cursor<'a> {
        Cursor { buf, pos: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn error(&self, what: impl std::fmt::Display) -> DecodeError {
        DecodeError::Avro(format!("{what} at byte {}", self.pos))
    }

    /// A zigzag varint (`int` or `long`).
    pub(crate) fn long(&mut self) -> Result<i64, DecodeError> {
        let mut value: u64 = 0;
        let mut shift = 0;
        loop {
            let Some(&byte) = self.buf.get(self.pos) else {
                return Err(self.error("input ends inside a varint"));
            };
            self.pos += 1;
            if shift == 63 && byte > 1 {
                return Err(self.error("varint overflows 64 bits"));
            }
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok((value >> 1) as i64 ^ -((value & 1) as i64));
            }
            shift += 7;
        }
    }

    /// A non-negative length that fits in the remaining input.
    pub(crate) fn len(&mut self) -> Result<usize, DecodeError> {
        let len = self.long()?;
        if len < 0 {
            return Err(self.error(format!("negative length {len}")));
        }
        match usize::try_from(len) {
            Ok(len) if len <= self.remaining() => Ok(len),
            _ => Err(self.error(format!("length {len} exceeds the {} remaining bytes", self.remaining()))),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(self.error(format!("input ends {} bytes early", n - self.remaining())));
        }
        let bytes = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N)?;
        Ok(bytes.try_into().expect("take returns N bytes"))
    }

    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.len()?;
        self.take(len)
    }

    fn str(&mut self, field: &'static str) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| DecodeError::InvalidUtf8(field))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::rabin::Rabin;
    use apache_avro::types::Value;
    use apache_avro::writer::datum::GenericDatumWriter;
    use apache_avro::{Days, Decimal, GenericSingleObjectWriter, Millis, Months};

    fn event() -> AuthEvent {
        AuthEvent {
            event_id: Uuid::parse_str("6f1c2c4e-8a47-4f7e-9d3a-2b6f0c1d9e10").unwrap(),
            occurred_at: 1_748_779_200_123_456,
            action: "AUTH_LOGIN".to_owned(),
            user_id: Some("u-42".to_owned()),
            username: Some("zoë".to_owned()),
            ip_address: Some("2001:db8::7".parse().unwrap()),
            user_agent: Some("Mozilla/5.0".to_owned()),
            session_id: Some("s-1".to_owned()),
            request_id: Some("r-1".to_owned()),
            metadata: vec![("mfa".to_owned(), "totp".to_owned())],
        }
    }

    fn minimal_event() -> AuthEvent {
        AuthEvent {
            user_id: None,
            username: None,
            ip_address: None,
            user_agent: None,
            session_id: None,
            request_id: None,
            metadata: Vec::new(),
            ..event()
        }
    }

    fn ours() -> Schema {
        Schema::parse_str(AUTH_EVENT_SCHEMA).unwrap()
    }

    fn plan(avsc: &str) -> ReadPlan {
        ReadPlan::compile(&Schema::parse_str(avsc).unwrap()).unwrap()
    }

    fn compile_error(avsc: &str) -> String {
        match ReadPlan::compile(&Schema::parse_str(avsc).unwrap()) {
            Err(DecodeError::IncompatibleSchema(_, reason)) => reason,
            other => panic!("expected an incompatible schema, got {other:?}"),
        }
    }

    /// Encodes with apache_avro's own writer, the reference implementation.
    fn reference_write(schema: &Schema, value: Value) -> Vec<u8> {
        GenericDatumWriter::builder(schema).build().unwrap().write_value_to_vec(value).unwrap()
    }

    fn union(index: u32, value: Value) -> Value {
        Value::Union(index, Box::new(value))
    }

    fn optional(text: Option<&str>) -> Value {
        match text {
            None => union(0, Value::Null),
            Some(text) => union(1, Value::String(text.to_owned())),
        }
    }

    fn string_map(entries: &[(String, String)]) -> Value {
        Value::Map(entries.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect())
    }

    fn reference_value(e: &AuthEvent) -> Value {
        Value::Record(vec![
            ("event_id".into(), Value::Uuid(e.event_id)),
            ("occurred_at".into(), Value::TimestampMicros(e.occurred_at)),
            ("action".into(), Value::String(e.action.clone())),
            ("user_id".into(), optional(e.user_id.as_deref())),
            ("username".into(), optional(e.username.as_deref())),
            ("ip_address".into(), optional(e.ip_address.map(|ip| ip.to_string()).as_deref())),
            ("user_agent".into(), optional(e.user_agent.as_deref())),
            ("session_id".into(), optional(e.session_id.as_deref())),
            ("request_id".into(), optional(e.request_id.as_deref())),
            ("metadata".into(), string_map(&e.metadata)),
        ])
    }

    #[test]
    fn encode_body_matches_the_reference_writer_byte_for_byte() {
        for e in [event(), minimal_event()] {
            assert_eq!(encode_body(&e), reference_write(&ours(), reference_value(&e)));
        }
    }

    #[test]
    fn decodes_what_the_reference_writer_wrote() {
        let plan = ReadPlan::compile(&ours()).unwrap();
        for mut e in [event(), minimal_event()] {
            e.metadata = vec![
                ("a".to_owned(), "1".to_owned()),
                ("b".to_owned(), String::new()),
                ("c".to_owned(), "ünïcödé".to_owned()),
            ];
            let mut decoded = plan.decode(&reference_write(&ours(), reference_value(&e))).unwrap();
            // The reference writer takes a HashMap: entry order is arbitrary.
            decoded.metadata.sort();
            assert_eq!(decoded, e);
        }
    }

    #[test]
    fn round_trips_own_encoding() {
        let plan = ReadPlan::compile(&ours()).unwrap();
        for e in [event(), minimal_event()] {
            assert_eq!(plan.decode(&encode_body(&e)), Ok(e));
        }
    }

    #[test]
    fn single_object_fingerprints_of_both_flavours_are_known() {
        let e = event();
        let mut reference = Vec::new();
        GenericSingleObjectWriter::new_with_capacity(&ours(), 1024)
            .unwrap()
            .write_value(reference_value(&e), &mut reference)
            .unwrap();
        let (their_fingerprint, body) = split_single_object(&reference).unwrap();
        assert_eq!(body, encode_body(&e));
        assert_eq!(schema_fingerprints(&ours()), vec![auth_event_fingerprint(), their_fingerprint]);
        assert_eq!(single_object_frame(their_fingerprint, &encode_body(&e)), reference);
    }

    #[test]
    fn fingerprint_of_our_schema_follows_the_specification() {
        let optional = |name: &str| format!(r#"{{"name":"{name}","type":["null","string"]}}"#);
        let canonical = format!(
            r#"{{"name":"io.audit.AuthEvent","type":"record","fields":[{{"name":"event_id","type":"string"}},{{"name":"occurred_at","type":"long"}},{{"name":"action","type":"string"}},{},{},{},{},{},{},{{"name":"metadata","type":{{"type":"map","values":"string"}}}}]}}"#,
            optional("user_id"),
            optional("username"),
            optional("ip_address"),
            optional("user_agent"),
            optional("session_id"),
            optional("request_id"),
        );
        assert_eq!(canonical_form(&ours()), canonical);
        // apache_avro's own canonical form differs here (see canonical_form)...
        assert_ne!(ours().canonical_form(), canonical);
        // ...but its digest agrees once given the right text.
        let reparsed = Schema::parse_str(&canonical).unwrap();
        assert_eq!(reparsed.canonical_form(), canonical);
        let digest = reparsed.fingerprint::<Rabin>().bytes;
        assert_eq!(auth_event_fingerprint(), u64::from_le_bytes(digest.try_into().unwrap()));
        assert_eq!(auth_event_fingerprint(), crc64_avro(canonical.as_bytes()));
    }

    #[test]
    fn canonical_form_agrees_with_apache_avro_without_logical_types() {
        let schema = Schema::parse_str(
            r#"{"type": "record", "name": "Outer", "namespace": "n", "doc": "d", "fields": [
                {"name": "a", "type": {"type": "fixed", "name": "F", "size": 4}, "default": "abcd"},
                {"name": "b", "type": ["null", "F", {"type": "enum", "name": "other.E", "symbols": ["X", "Y"]}]},
                {"name": "c", "type": {"type": "array", "items": {"type": "record", "name": "In", "fields": [
                    {"name": "d", "type": {"type": "map", "values": ["other.E", "In", "int"]}}
                ]}}},
                {"name": "e", "type": {"type": "double"}, "aliases": ["ee"]},
                {"name": "f", "type": "other.E"}
            ]}"#,
        )
        .unwrap();
        assert_eq!(
            canonical_form(&schema),
            r#"{"name":"n.Outer","type":"record","fields":[{"name":"a","type":{"name":"n.F","type":"fixed","size":4}},{"name":"b","type":["null","n.F",{"name":"other.E","type":"enum","symbols":["X","Y"]}]},{"name":"c","type":{"type":"array","items":{"name":"n.In","type":"record","fields":[{"name":"d","type":{"type":"map","values":["other.E","n.In","int"]}}]}}},{"name":"e","type":"double"},{"name":"f","type":"other.E"}]}"#
        );
        assert_eq!(canonical_form(&schema), schema.canonical_form());
        let digest = schema.fingerprint::<Rabin>().bytes;
        assert_eq!(schema_fingerprint(&schema), u64::from_le_bytes(digest.try_into().unwrap()));
        assert_eq!(schema_fingerprints(&schema), vec![schema_fingerprint(&schema)]);
    }

    #[test]
    fn canonical_form_drops_logical_types() {
        let schema = Schema::parse_str(EVOLVED).unwrap();
        let canonical = canonical_form(&schema);
        for expected in [
            r#"{"name":"event_id","type":{"name":"com.example.Id","type":"fixed","size":16}}"#,
            r#"{"name":"occurred_at","type":"long"}"#,
            r#"{"name":"amount","type":"bytes"}"#,
            r#"{"name":"day","type":"int"}"#,
            r#"{"name":"ttl","type":{"name":"com.example.Ttl","type":"fixed","size":12}}"#,
            r#"{"name":"correlation","type":"string"}"#,
            r#"{"name":"choice","type":["null","int","string","com.example.Trace","com.example.Severity"]}"#,
        ] {
            assert!(canonical.contains(expected), "{expected} not in {canonical}");
        }
    }

    #[test]
    fn framing_helpers() {
        assert_eq!(confluent_frame(0x0102_0304, b"body"), b"\x00\x01\x02\x03\x04body");
        assert_eq!(split_confluent(b"\x00\x01\x02\x03\x04body"), Ok((0x0102_0304, &b"body"[..])));
        assert_eq!(
            split_confluent(b"\x00\x00\x00\x07"),
            Err(DecodeError::Avro("Confluent header truncated: 4 of 5 bytes".into()))
        );

        let framed = single_object_frame(0x0807_0605_0403_0201, b"x");
        assert_eq!(framed, b"\xC3\x01\x01\x02\x03\x04\x05\x06\x07\x08x");
        assert_eq!(split_single_object(&framed), Ok((0x0807_0605_0403_0201, &b"x"[..])));
        assert_eq!(split_single_object(&framed[..9]).unwrap_err().code(), "malformed_avro");
        assert_eq!(split_single_object(b"\xC3\x02\0\0\0\0\0\0\0\0").unwrap_err().code(), "malformed_avro");
    }

    /// A newer producer schema: extra fields of every kind around ours,
    /// reordered fields, different but readable types, and no user_agent,
    /// session_id or request_id.
    const EVOLVED: &str = r#"{
      "type": "record", "name": "AuthEvent", "namespace": "com.example",
      "fields": [
        {"name": "schema_version", "type": "int"},
        {"name": "event_id", "type": {"type": "fixed", "name": "Id", "size": 16, "logicalType": "uuid"}},
        {"name": "trace", "type": {"type": "record", "name": "Trace", "fields": [
            {"name": "span", "type": "long"},
            {"name": "sampled", "type": "boolean"},
            {"name": "parent", "type": ["null", "Trace"]}
        ]}},
        {"name": "action", "type": "string"},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "occurred_at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "scores", "type": {"type": "map", "values": "double"}},
        {"name": "severity", "type": {"type": "enum", "name": "Severity", "symbols": ["LOW", "HIGH"]}},
        {"name": "user_id", "type": ["long", "null"]},
        {"name": "digest", "type": {"type": "fixed", "name": "Digest", "size": 8}},
        {"name": "username", "type": ["string", "null"]},
        {"name": "choice", "type": ["null", "int", "string", "Trace", "Severity"]},
        {"name": "ratio", "type": "float"},
        {"name": "weight", "type": "double"},
        {"name": "blob", "type": "bytes"},
        {"name": "ip_address", "type": ["null", "string"]},
        {"name": "previous", "type": ["null", "Trace"]},
        {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}},
        {"name": "metadata", "type": {"type": "map", "values": "string"}},
        {"name": "nothing", "type": "null"},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {"name": "ttl", "type": {"type": "fixed", "name": "Ttl", "size": 12, "logicalType": "duration"}},
        {"name": "correlation", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "nested", "type": {"type": "array", "items": {"type": "map", "values": ["null", "Digest"]}}}
      ]
    }"#;

    fn trace(span: i64, parent: Option<Value>) -> Value {
        Value::Record(vec![
            ("span".into(), Value::Long(span)),
            ("sampled".into(), Value::Boolean(true)),
            ("parent".into(), parent.map_or(union(0, Value::Null), |p| union(1, p))),
        ])
    }

    fn evolved_value(e: &AuthEvent, user_id: Option<i64>) -> Value {
        Value::Record(vec![
            ("schema_version".into(), Value::Int(3)),
            ("event_id".into(), Value::Uuid(e.event_id)),
            ("trace".into(), trace(1, Some(trace(2, Some(trace(3, None)))))),
            ("action".into(), Value::String(e.action.clone())),
            ("tags".into(), Value::Array(vec![Value::String("a".into()), Value::String("bb".into())])),
            ("occurred_at".into(), Value::TimestampMillis(e.occurred_at / 1000)),
            ("scores".into(), Value::Map([("x".to_owned(), Value::Double(0.5))].into())),
            ("severity".into(), Value::Enum(1, "HIGH".into())),
            ("user_id".into(), user_id.map_or(union(1, Value::Null), |id| union(0, Value::Long(id)))),
            ("digest".into(), Value::Fixed(8, vec![9; 8])),
            ("username".into(), e.username.clone().map_or(union(1, Value::Null), |u| union(0, Value::String(u)))),
            ("choice".into(), union(3, trace(4, None))),
            ("ratio".into(), Value::Float(1.5)),
            ("weight".into(), Value::Double(-2.25)),
            ("blob".into(), Value::Bytes(vec![0, 255, 7])),
            ("ip_address".into(), optional(e.ip_address.map(|ip| ip.to_string()).as_deref())),
            ("previous".into(), union(1, trace(5, None))),
            ("amount".into(), Value::Decimal(Decimal::from(vec![0x01, 0x02]))),
            ("metadata".into(), string_map(&e.metadata)),
            ("nothing".into(), Value::Null),
            ("day".into(), Value::Date(20_000)),
            ("ttl".into(), Value::Duration(apache_avro::Duration::new(Months::new(1), Days::new(2), Millis::new(3)))),
            ("correlation".into(), Value::Uuid(Uuid::from_u128(7))),
            (
                "nested".into(),
                Value::Array(vec![Value::Map(
                    [("n".to_owned(), union(0, Value::Null)), ("d".to_owned(), union(1, Value::Fixed(8, vec![1; 8])))]
                        .into(),
                )]),
            ),
        ])
    }

    #[test]
    fn evolved_writer_schema_skips_unknown_fields_of_every_type() {
        let schema = Schema::parse_str(EVOLVED).unwrap();
        let plan = ReadPlan::compile(&schema).unwrap();
        let e = AuthEvent {
            occurred_at: 1_748_779_200_123_000,
            user_id: Some("42".to_owned()),
            user_agent: None,
            session_id: None,
            request_id: None,
            ..event()
        };
        let body = reference_write(&schema, evolved_value(&e, Some(42)));
        assert_eq!(plan.decode(&body), Ok(e.clone()));

        let e = AuthEvent { user_id: None, username: None, ip_address: Some("192.0.2.1".parse().unwrap()), ..e };
        let body = reference_write(&schema, evolved_value(&e, None));
        assert_eq!(plan.decode(&body), Ok(e));
    }

    #[test]
    fn writer_without_optional_fields() {
        let plan = plan(
            r#"{"type": "record", "name": "Old", "fields": [
                {"name": "action", "type": ["null", "string"]},
                {"name": "event_id", "type": "string"},
                {"name": "occurred_at", "type": "long"},
                {"name": "user_id", "type": "int"}
            ]}"#,
        );
        let mut body = Vec::new();
        write_long(&mut body, 1);
        write_bytes(&mut body, b"AUTH_LOGOUT");
        write_bytes(&mut body, b"6f1c2c4e8a474f7e9d3a2b6f0c1d9e10");
        write_long(&mut body, -5);
        write_long(&mut body, -17);
        assert_eq!(
            plan.decode(&body),
            Ok(AuthEvent {
                occurred_at: -5,
                action: "AUTH_LOGOUT".to_owned(),
                user_id: Some("-17".to_owned()),
                ..minimal_event()
            })
        );

        // A null in a nullable writer field that we require.
        let mut body = vec![0];
        write_bytes(&mut body, b"6f1c2c4e8a474f7e9d3a2b6f0c1d9e10");
        write_long(&mut body, 1);
        write_long(&mut body, 1);
        assert_eq!(plan.decode(&body), Err(DecodeError::Invalid(Violation::MissingField("action"))));
    }

    #[test]
    fn incompatible_writer_schemas_fail_to_compile() {
        let fields = |extra: &str| {
            format!(
                r#"{{"type": "record", "name": "E", "fields": [
                    {{"name": "event_id", "type": "string"}},
                    {{"name": "occurred_at", "type": "long"}},
                    {{"name": "action", "type": "string"}}{extra}]}}"#
            )
        };
        assert!(compile_error(r#"{"type": "record", "name": "E", "fields": [{"name": "occurred_at", "type": "long"}, {"name": "action", "type": "string"}]}"#)
            .contains("no field `event_id`"));
        assert!(compile_error(r#"{"type": "record", "name": "E", "fields": [{"name": "event_id", "type": "string"}, {"name": "action", "type": "string"}]}"#)
            .contains("no field `occurred_at`"));
        assert_eq!(
            compile_error(&fields(r#", {"name": "username", "type": "int"}"#)),
            "`username` has writer type Int, expected string or bytes"
        );
        assert_eq!(
            compile_error(&fields(r#", {"name": "metadata", "type": {"type": "map", "values": "long"}}"#)),
            "`metadata` has writer type Map, expected map of string"
        );
        assert_eq!(
            compile_error(&fields(r#", {"name": "ip_address", "type": ["null", "int"]}"#)),
            "no branch of the writer union of `ip_address` is string or bytes"
        );
        assert_eq!(
            compile_error(
                r#"{"type": "record", "name": "E", "fields": [{"name": "event_id", "type": "string"}, {"name": "occurred_at", "type": "double"}, {"name": "action", "type": "string"}]}"#
            ),
            "`occurred_at` has writer type Double, expected long, timestamp-micros or timestamp-millis"
        );
        assert_eq!(
            ReadPlan::compile(&Schema::parse_str(r#""string""#).unwrap()).unwrap_err(),
            DecodeError::IncompatibleSchema("(top level)".into(), "top-level type is String, not a record".into())
        );
        // An always-null optional field is fine.
        ReadPlan::compile(&Schema::parse_str(&fields(r#", {"name": "username", "type": "null"}"#)).unwrap()).unwrap();
    }

    #[test]
    fn unreadable_union_branch_fails_only_when_used() {
        let plan = plan(
            r#"{"type": "record", "name": "E", "fields": [
                {"name": "event_id", "type": "string"},
                {"name": "occurred_at", "type": "long"},
                {"name": "action", "type": "string"},
                {"name": "username", "type": ["null", "string", "int"]}
            ]}"#,
        );
        let mut body = Vec::new();
        write_bytes(&mut body, b"6f1c2c4e-8a47-4f7e-9d3a-2b6f0c1d9e10");
        write_long(&mut body, 1);
        write_bytes(&mut body, b"A");
        let prefix = body.clone();
        write_long(&mut body, 1);
        write_bytes(&mut body, b"bob");
        assert_eq!(plan.decode(&body).unwrap().username.as_deref(), Some("bob"));

        let mut body = prefix.clone();
        write_long(&mut body, 2);
        write_long(&mut body, 7);
        assert_eq!(
            plan.decode(&body),
            Err(DecodeError::IncompatibleSchema(
                "E".into(),
                "`username` uses union branch 2, which cannot be read as string or bytes".into()
            ))
        );

        let mut body = prefix;
        write_long(&mut body, 3);
        assert_eq!(
            plan.decode(&body),
            Err(DecodeError::Avro("union branch 3 of `username` does not exist at byte 41".into()))
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        let plan = ReadPlan::compile(&ours()).unwrap();
        let body = encode_body(&event());
        for len in 0..body.len() {
            let err = plan.decode(&body[..len]).unwrap_err();
            assert_eq!(err.code(), "malformed_avro", "truncated to {len}: {err}");
        }
        assert_eq!(
            plan.decode(&body[..10]),
            Err(DecodeError::Avro("length 36 exceeds the 9 remaining bytes at byte 1".into()))
        );
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let plan = ReadPlan::compile(&ours()).unwrap();
        let mut body = encode_body(&event());
        body.push(0);
        assert_eq!(plan.decode(&body), Err(DecodeError::Avro("1 trailing bytes after the record".into())));
    }

    #[test]
    fn bad_varints_and_lengths() {
        let plan = ReadPlan::compile(&ours()).unwrap();
        // event_id length as an 11-byte varint
        let err = plan.decode(&[0xff; 11]).unwrap_err();
        assert_eq!(err, DecodeError::Avro("varint overflows 64 bits at byte 10".into()));
        // Negative length (-1).
        assert_eq!(plan.decode(&[0x01]), Err(DecodeError::Avro("negative length -1 at byte 1".into())));
        // A length of 2^40 must be refused before any allocation.
        let mut body = Vec::new();
        write_long(&mut body, 1 << 40);
        body.extend_from_slice(b"abc");
        assert_eq!(
            plan.decode(&body),
            Err(DecodeError::Avro("length 1099511627776 exceeds the 3 remaining bytes at byte 6".into()))
        );
        // A metadata block claiming 2^40 entries.
        let mut e = minimal_event();
        e.metadata.clear();
        let mut body = encode_body(&e);
        body.pop();
        write_long(&mut body, 1 << 40);
        body.extend_from_slice(&[2, b'k', 2, b'v', 0]);
        assert!(
            plan.decode(&body)
                .unwrap_err()
                .to_string()
                .contains("map block of 1099511627776 entries exceeds the input")
        );
    }

    #[test]
    fn invalid_utf8_is_reported_with_the_field() {
        let plan = ReadPlan::compile(&ours()).unwrap();
        let mut e = event();
        e.username = Some("zzz".to_owned());
        let mut body = encode_body(&e);
        let at = body.windows(3).position(|w| w == b"zzz").unwrap();
        body[at] = 0xc3; // a lead byte without its continuation
        assert_eq!(plan.decode(&body), Err(DecodeError::InvalidUtf8("username")));

        let mut e = event();
        e.metadata = vec![("k".to_owned(), "zzz".to_owned())];
        let mut body = encode_body(&e);
        let at = body.windows(3).position(|w| w == b"zzz").unwrap();
        body[at + 1] = 0xff;
        assert_eq!(plan.decode(&body), Err(DecodeError::InvalidUtf8("metadata")));
    }

    #[test]
    fn ip_addresses_and_uuids() {
        let plan = ReadPlan::compile(&ours()).unwrap();
        let with_ip = |ip: &str| {
            let mut e = minimal_event();
            e.ip_address = Some("192.0.2.1".parse().unwrap());
            let body = encode_body(&e);
            let text = b"192.0.2.1";
            let at = body.windows(text.len()).position(|w| w == text).unwrap();
            let mut out = body[..at - 1].to_vec();
            write_bytes(&mut out, ip.as_bytes());
            out.extend_from_slice(&body[at + text.len()..]);
            plan.decode(&out)
        };
        assert_eq!(with_ip("203.0.113.9").unwrap().ip_address, Some("203.0.113.9".parse().unwrap()));
        assert_eq!(with_ip("fe80::1:2").unwrap().ip_address, Some("fe80::1:2".parse().unwrap()));
        assert_eq!(with_ip("").unwrap().ip_address, None);
        for bad in ["203.0.113.256", "1.2.3", "fe80::1::2", "fe80::1%eth0", "example.com"] {
            assert_eq!(with_ip(bad), Err(DecodeError::Invalid(Violation::InvalidIp)), "{bad}");
        }

        let mut body = Vec::new();
        write_bytes(&mut body, b"not-a-uuid");
        body.extend_from_slice(&encode_body(&minimal_event())[37..]);
        assert_eq!(plan.decode(&body), Err(DecodeError::Invalid(Violation::InvalidUuid)));
    }

    #[test]
    fn millis_timestamps_saturate_instead_of_overflowing() {
        let plan = plan(
            r#"{"type": "record", "name": "E", "fields": [
                {"name": "event_id", "type": "string"},
                {"name": "occurred_at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
                {"name": "action", "type": "string"}
            ]}"#,
        );
        let body = |millis: i64| {
            let mut body = Vec::new();
            write_bytes(&mut body, b"6f1c2c4e-8a47-4f7e-9d3a-2b6f0c1d9e10");
            write_long(&mut body, millis);
            write_bytes(&mut body, b"A");
            body
        };
        assert_eq!(plan.decode(&body(1_700_000_000_123)).unwrap().occurred_at, 1_700_000_000_123_000);
        assert_eq!(plan.decode(&body(i64::MAX / 10)).unwrap().occurred_at, i64::MAX);
        assert_eq!(plan.decode(&body(i64::MIN)).unwrap().occurred_at, i64::MIN);
    }

    const BLOCKS: &str = r#"{"type": "record", "name": "E", "fields": [
        {"name": "event_id", "type": "string"},
        {"name": "occurred_at", "type": "long"},
        {"name": "action", "type": "string"},
        {"name": "tags", "type": {"type": "array", "items": "long"}},
        {"name": "attrs", "type": {"type": "map", "values": "int"}},
        {"name": "nulls", "type": {"type": "array", "items": "null"}},
        {"name": "metadata", "type": {"type": "map", "values": "string"}}
    ]}"#;

    fn blocks_prefix() -> Vec<u8> {
        let mut body = Vec::new();
        write_bytes(&mut body, b"6f1c2c4e-8a47-4f7e-9d3a-2b6f0c1d9e10");
        write_long(&mut body, 1);
        write_bytes(&mut body, b"A");
        body
    }

    #[test]
    fn blocks_with_negative_counts_and_byte_sizes() {
        let plan = plan(BLOCKS);
        let mut body = blocks_prefix();
        // tags: a sized block of two longs, then a plain block of one.
        body.extend_from_slice(&[3, 2, 2, 4, 2, 6, 0]);
        // attrs: a sized block {"a": 1}, then a plain block {"b": 2}.
        body.extend_from_slice(&[1, 6, 2, b'a', 2, 2, 2, b'b', 4, 0]);
        // nulls: a huge count of zero-width items must not spin.
        write_long(&mut body, i64::MAX);
        body.push(0);
        // metadata: a sized block of one entry, then a plain one.
        body.extend_from_slice(&[1, 8, 2, b'k', 4, b'v', b'1', 2, 4, b'k', b'2', 0, 0]);
        assert_eq!(
            plan.decode(&body).unwrap().metadata,
            vec![("k".to_owned(), "v1".to_owned()), ("k2".to_owned(), String::new())]
        );

        // A sized block whose size runs past the input.
        let mut body = blocks_prefix();
        body.extend_from_slice(&[3, 100, 2]);
        assert_eq!(plan.decode(&body).unwrap_err().code(), "malformed_avro");
    }

    #[test]
    fn deeply_nested_values_are_refused() {
        let plan = plan(
            r#"{"type": "record", "name": "E", "fields": [
                {"name": "event_id", "type": "string"},
                {"name": "occurred_at", "type": "long"},
                {"name": "action", "type": "string"},
                {"name": "chain", "type": {"type": "record", "name": "Link", "fields": [
                    {"name": "next", "type": ["null", "Link"]}
                ]}}
            ]}"#,
        );
        let chain = |depth: usize| {
            let mut body = blocks_prefix();
            body.extend(std::iter::repeat_n(2u8, depth));
            body.push(0);
            body
        };
        assert!(plan.decode(&chain(20)).is_ok());
        let err = plan.decode(&chain(100_000)).unwrap_err();
        assert!(err.to_string().contains("nested deeper than 128 levels"), "{err}");
    }

    #[test]
    fn enum_index_is_checked_when_skipping() {
        let plan = plan(
            r#"{"type": "record", "name": "E", "fields": [
                {"name": "level", "type": {"type": "enum", "name": "L", "symbols": ["A", "B"]}},
                {"name": "event_id", "type": "string"},
                {"name": "occurred_at", "type": "long"},
                {"name": "action", "type": "string"}
            ]}"#,
        );
        assert_eq!(plan.decode(&[4]), Err(DecodeError::Avro("enum index 2 out of range at byte 1".into())));
    }

    #[test]
    fn read_plan_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<ReadPlan>();
    }
}
