//! Tails' upgrade-description files (UDFs): the `upgrades.yml` that tells
//! a Tails of a given version, channel and build target which upgrades it
//! may install, with the URL, size and sha256 of the full ISO and of the
//! IUK.
//!
//! [`generate`] writes every file Tails' generator
//! (`tails-iuk-generate-upgrade-description-files`) writes, at the same
//! paths, with the same bytes: YAML::XS's serialisation, existing files
//! of previous versions loaded and rewritten the way it does, the same
//! channels skipped. [`check`] parses a UDF and checks every field an
//! Upgrader needs. Nothing here touches the file system: callers give the
//! digests and the existing files, and write what comes back.

use std::path::{Path, PathBuf};

use iukfarm_engine::kit::yaml::{self, Value};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;
use yaml_rust2::{Yaml, YamlLoader};

/// Far above any UDF (one holds a few upgrades: about a kilobyte).
pub const MAX_UDF_BYTES: usize = 1 << 20;
/// YAML nodes a UDF may have once its aliases are expanded: the loader
/// copies an anchored node for each alias, so nine levels of ten aliases
/// each would otherwise take 10^9 nodes of memory from about 400 bytes.
const MAX_NODES: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {why}")]
    Invalid { path: String, why: String },
    #[error("{0}")]
    Options(String),
}

fn invalid(path: &Path, why: impl Into<String>) -> Error {
    Error::Invalid {
        path: path.display().to_string(),
        why: why.into(),
    }
}

/// The channel of a release, and of a UDF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Stable,
    Alpha,
}

impl Channel {
    pub fn name(self) -> &'static str {
        match self {
            Channel::Stable => "stable",
            Channel::Alpha => "alpha",
        }
    }

    pub fn parse(s: &str) -> Result<Channel, Error> {
        match s {
            "stable" => Ok(Channel::Stable),
            "alpha" => Ok(Channel::Alpha),
            _ => Err(Error::Options(format!(
                "channel {s:?} is not supported (stable or alpha)"
            ))),
        }
    }
}

/// A file a UDF points to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub sha256: String,
    pub size: u64,
}

/// What the generator takes on its command line.
#[derive(Debug, Clone)]
pub struct Release {
    pub version: String,
    pub next_versions: Vec<String>,
    pub previous_versions: Vec<String>,
    /// `type: major` (Tails' release process always passes the flag).
    pub major: bool,
    pub channel: Channel,
    pub build_target: String,
    pub product_name: String,
}

impl Release {
    /// Every version and name ends up in a path or a URL: one path
    /// component each, printable, no spaces.
    pub fn check(&self) -> Result<(), Error> {
        if self.next_versions.is_empty() {
            return Err(Error::Options(
                "at least one next version is required (as Tails' generator requires)".into(),
            ));
        }
        let names = [
            ("version", &self.version),
            ("build target", &self.build_target),
            ("product name", &self.product_name),
        ];
        let versions = self
            .next_versions
            .iter()
            .chain(&self.previous_versions)
            .map(|v| ("version", v));
        for (what, v) in names.into_iter().chain(versions) {
            let ok = !v.is_empty()
                && v != "."
                && v != ".."
                && v.bytes().all(|b| b.is_ascii_graphic() && b != b'/');
            if !ok {
                return Err(Error::Options(format!(
                    "{what} {v:?} must be one path component of printable characters \
                     without spaces"
                )));
            }
        }
        Ok(())
    }

    /// The IUK from `previous` to this release, as `tails-create-iuk`
    /// names it.
    pub fn iuk_name(&self, previous: &str) -> String {
        format!(
            "{}_{}_{previous}_to_{}.iuk",
            self.product_name, self.build_target, self.version
        )
    }

    fn details_url(&self) -> String {
        let v = self.version.replacen('~', "-", 1);
        match self.channel {
            Channel::Stable => format!("https://tails.net/news/version_{v}/"),
            Channel::Alpha => format!("https://tails.net/news/test_{v}/"),
        }
    }

    fn iso_url(&self) -> String {
        let stem = format!(
            "{}-{}-{}",
            self.product_name.to_lowercase(),
            self.build_target,
            self.version
        );
        format!(
            "https://download.tails.net/tails/{}/{stem}/{stem}.iso",
            self.channel.name()
        )
    }

    fn iuk_url(&self, name: &str) -> String {
        format!(
            "https://download.tails.net/tails/{}/iuk/v2/{name}",
            self.channel.name()
        )
    }
}

/// Where the UDF of (`version`, `channel`) lives in Tails' website
/// checkout.
pub fn path(product: &str, version: &str, build_target: &str, channel: &str) -> PathBuf {
    Path::new("wiki/src/upgrade/v2")
        .join(product)
        .join(version)
        .join(build_target)
        .join(channel)
        .join("upgrades.yml")
}

/// A UDF's header, with each field as it was loaded (a plain `6.0` is a
/// Perl number and is written back plain; a quoted `'6.0'` is a string).
#[derive(Debug, Clone, PartialEq)]
pub struct Udf {
    pub product_name: Value,
    pub initial_install_version: Value,
    pub build_target: Value,
    pub channel: Value,
    /// Absent in a UDF that was never given upgrades.
    pub upgrades: Option<Vec<Value>>,
}

impl Udf {
    fn new(product: &str, version: &str, build_target: &str, channel: Channel) -> Udf {
        Udf {
            product_name: Value::str(product),
            initial_install_version: Value::str(version),
            build_target: Value::str(build_target),
            channel: Value::str(channel.name()),
            upgrades: None,
        }
    }

    /// The bytes YAML::XS writes for it.
    pub fn to_yaml(&self) -> Vec<u8> {
        let mut m = vec![
            ("product-name", self.product_name.clone()),
            (
                "initial-install-version",
                self.initial_install_version.clone(),
            ),
            ("build-target", self.build_target.clone()),
            ("channel", self.channel.clone()),
        ];
        if let Some(u) = &self.upgrades {
            m.push(("upgrades", Value::Seq(u.clone())));
        }
        yaml::dump(&Value::map(m))
    }

    /// Parses a UDF as the generator and its checker load one: YAML with
    /// the four header fields defined scalars and `upgrades`, if present,
    /// a list. Other top-level keys are dropped.
    pub fn parse(file: &Path, bytes: &[u8]) -> Result<Udf, Error> {
        if bytes.len() > MAX_UDF_BYTES {
            return Err(invalid(
                file,
                format!("{} bytes: not a UDF (at most {MAX_UDF_BYTES})", bytes.len()),
            ));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| invalid(file, "not UTF-8 text"))?;
        if text.trim().is_empty() {
            return Err(invalid(file, "empty"));
        }
        let mut nodes = NodeCount::default();
        Parser::new_from_str(text)
            .load(&mut nodes, true)
            .map_err(|e| invalid(file, e.to_string()))?;
        if nodes.total > MAX_NODES {
            return Err(invalid(
                file,
                format!(
                    "more than {MAX_NODES} YAML nodes once its aliases are expanded: not a UDF"
                ),
            ));
        }
        let docs = YamlLoader::load_from_str(text).map_err(|e| invalid(file, e.to_string()))?;
        let Some(Yaml::Hash(h)) = docs.first() else {
            return Err(invalid(file, "not a YAML mapping"));
        };
        let field = |k: &str| -> Result<Value, Error> {
            match h.get(&Yaml::String(k.into())) {
                Some(y) => perl_scalar(y)
                    .ok_or_else(|| invalid(file, format!("{k} is not a defined scalar"))),
                None => Err(invalid(file, format!("{k} is missing"))),
            }
        };
        let upgrades = match h.get(&Yaml::String("upgrades".into())) {
            None => None,
            Some(Yaml::Array(a)) => Some(
                a.iter()
                    .map(|y| perl_value(y).ok_or_else(|| invalid(file, "an upgrade holds null")))
                    .collect::<Result<_, _>>()?,
            ),
            Some(_) => return Err(invalid(file, "upgrades is not a list")),
        };
        Ok(Udf {
            product_name: field("product-name")?,
            initial_install_version: field("initial-install-version")?,
            build_target: field("build-target")?,
            channel: field("channel")?,
            upgrades,
        })
    }
}

/// A loaded scalar as YAML::XS gives it to Perl; None for null and
/// collections.
fn perl_scalar(y: &Yaml) -> Option<Value> {
    match y {
        Yaml::String(s) => Some(Value::str(s)),
        Yaml::Real(s) => Some(Value::Num(s.clone().into_bytes())),
        Yaml::Integer(i) => Some(Value::Num(i.to_string().into_bytes())),
        Yaml::Boolean(b) => Some(Value::Num(b.to_string().into_bytes())),
        _ => None,
    }
}

fn perl_value(y: &Yaml) -> Option<Value> {
    match y {
        Yaml::Array(a) => a
            .iter()
            .map(perl_value)
            .collect::<Option<_>>()
            .map(Value::Seq),
        Yaml::Hash(h) => h
            .iter()
            .map(|(k, v)| Some((key_text(k)?, perl_value(v)?)))
            .collect::<Option<_>>()
            .map(Value::Map),
        _ => perl_scalar(y),
    }
}

fn key_text(k: &Yaml) -> Option<Vec<u8>> {
    match perl_scalar(k)? {
        Value::Str(s) | Value::Num(s) => Some(s),
        _ => None,
    }
}

/// Reads the current bytes of a UDF of the checkout, None if it has none.
pub type Existing<'a> = dyn Fn(&Path) -> Result<Option<Vec<u8>>, Error> + 'a;

/// One file to write: where (relative to the website checkout), its
/// bytes, and whether it replaced an existing UDF's upgrades.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
    pub updated: bool,
}

/// Every UDF the generator writes for `r`, in its order; a path written
/// twice appears once, with the later bytes. `iso` is the new release's
/// ISO; `iuk(name)` gives the IUK of that name if there is one;
/// `existing(path)` the current bytes of a UDF in the checkout.
pub fn generate(
    r: &Release,
    iso: &Target,
    iuk: &dyn Fn(&str) -> Option<Target>,
    existing: &Existing<'_>,
) -> Result<Vec<Written>, Error> {
    r.check()?;
    let mut out: Vec<Written> = Vec::new();
    fn put(out: &mut Vec<Written>, w: Written) {
        out.retain(|o| o.path != w.path);
        out.push(w);
    }
    let channels = [Channel::Alpha, Channel::Stable];
    let fresh = |version: &str, c: Channel| {
        let path = path(&r.product_name, version, &r.build_target, c.name());
        let bytes = Udf::new(&r.product_name, version, &r.build_target, c).to_yaml();
        Written {
            path,
            bytes,
            updated: false,
        }
    };
    for c in channels {
        put(&mut out, fresh(&r.version, c));
    }
    for c in channels {
        for v in &r.next_versions {
            put(&mut out, fresh(v, c));
        }
    }
    let upgrade = |previous: &str| {
        let full = Value::map([
            ("type", Value::str("full")),
            ("target-files", Value::Seq(vec![target(iso, r.iso_url())])),
        ]);
        let mut paths = vec![full];
        let name = r.iuk_name(previous);
        if let Some(t) = iuk(&name) {
            paths.push(Value::map([
                ("type", Value::str("incremental")),
                (
                    "target-files",
                    Value::Seq(vec![target(&t, r.iuk_url(&name))]),
                ),
            ]));
        }
        Value::map([
            ("version", Value::str(&r.version)),
            ("details-url", Value::str(r.details_url())),
            ("type", Value::str(if r.major { "major" } else { "minor" })),
            ("upgrade-paths", Value::Seq(paths)),
        ])
    };
    for c in channels {
        for prev in &r.previous_versions {
            let skip = match (r.channel, c) {
                // A final version's alpha UDF is left alone by a stable release.
                (Channel::Stable, Channel::Alpha) => !is_prerelease(prev),
                // An alpha release touches only alpha UDFs.
                (Channel::Alpha, Channel::Stable) => true,
                _ => false,
            };
            if skip {
                continue;
            }
            let p = path(&r.product_name, prev, &r.build_target, c.name());
            // What this run already wrote counts as existing.
            let current = match out.iter().find(|w| w.path == p) {
                Some(w) => Some(w.bytes.clone()),
                None => existing(&p)?,
            };
            let mut udf = match current {
                Some(bytes) => Udf::parse(&p, &bytes)?,
                None => Udf::new(&r.product_name, prev, &r.build_target, c),
            };
            udf.upgrades = Some(vec![upgrade(prev)]);
            put(
                &mut out,
                Written {
                    path: p,
                    bytes: udf.to_yaml(),
                    updated: true,
                },
            );
        }
    }
    Ok(out)
}

fn target(t: &Target, url: String) -> Value {
    Value::map([
        ("sha256", Value::str(&t.sha256)),
        ("size", Value::num(t.size)),
        ("url", Value::str(url)),
    ])
}

/// `~alpha1`, `~beta2`, `~rc1` at the end, as the generator matches it.
fn is_prerelease(v: &str) -> bool {
    let Some((_, tail)) = v.rsplit_once('~') else {
        return false;
    };
    ["alpha", "beta", "rc"].iter().any(|p| {
        tail.strip_prefix(p)
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// Counts the nodes a document would load into, aliases expanded, without
/// expanding them.
#[derive(Default)]
struct NodeCount {
    total: u64,
    /// Expanded size of each anchored node, by anchor id.
    anchored: std::collections::HashMap<usize, u64>,
    /// Collections not yet ended: anchor id, total at their start.
    open: Vec<(usize, u64)>,
}

impl MarkedEventReceiver for NodeCount {
    fn on_event(&mut self, ev: Event, _: Marker) {
        match ev {
            Event::Scalar(_, _, anchor, _) => {
                self.total = self.total.saturating_add(1);
                if anchor > 0 {
                    self.anchored.insert(anchor, 1);
                }
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                self.open.push((anchor, self.total));
                self.total = self.total.saturating_add(1);
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((anchor, start)) = self.open.pop()
                    && anchor > 0
                {
                    self.anchored.insert(anchor, self.total - start);
                }
            }
            Event::Alias(id) => {
                let n = self.anchored.get(&id).copied().unwrap_or(1);
                self.total = self.total.saturating_add(n);
            }
            _ => {}
        }
    }
}

/// Parses a UDF and checks what an Upgrader relies on: the header, and
/// for each upgrade a version, a type, a details URL and one or two paths
/// (full, incremental) whose files each have an https URL, a size and a
/// sha256.
pub fn check(file: &Path, bytes: &[u8]) -> Result<Udf, Error> {
    let udf = Udf::parse(file, bytes)?;
    for (n, u) in udf.upgrades.iter().flatten().enumerate() {
        check_upgrade(u).map_err(|why| invalid(file, format!("upgrade {}: {why}", n + 1)))?;
    }
    Ok(udf)
}

fn get<'a>(v: &'a Value, key: &str) -> Result<&'a Value, String> {
    match v {
        Value::Map(m) => m
            .iter()
            .find(|(k, _)| k == key.as_bytes())
            .map(|(_, v)| v)
            .ok_or_else(|| format!("{key} is missing")),
        _ => Err("not a mapping".into()),
    }
}

fn text<'a>(v: &'a Value, key: &str) -> Result<&'a str, String> {
    match get(v, key)? {
        Value::Str(s) | Value::Num(s) => {
            std::str::from_utf8(s).map_err(|_| format!("{key} is not text"))
        }
        _ => Err(format!("{key} is not a scalar")),
    }
}

fn check_upgrade(u: &Value) -> Result<(), String> {
    text(u, "version")?;
    let url = text(u, "details-url")?;
    if !url.starts_with("https://") {
        return Err(format!("details-url {url:?} is not https"));
    }
    let ty = text(u, "type")?;
    if ty != "major" && ty != "minor" {
        return Err(format!("type {ty:?} is neither major nor minor"));
    }
    let Value::Seq(paths) = get(u, "upgrade-paths")? else {
        return Err("upgrade-paths is not a list".into());
    };
    if paths.is_empty() || paths.len() > 2 {
        return Err(format!("{} upgrade paths (1 or 2 expected)", paths.len()));
    }
    for p in paths {
        let ty = text(p, "type")?;
        if ty != "full" && ty != "incremental" {
            return Err(format!("path type {ty:?} is neither full nor incremental"));
        }
        let Value::Seq(files) = get(p, "target-files")? else {
            return Err("target-files is not a list".into());
        };
        if files.is_empty() {
            return Err(format!("the {ty} path has no target files"));
        }
        for f in files {
            let url = text(f, "url")?;
            if !url.starts_with("https://") {
                return Err(format!("url {url:?} is not https"));
            }
            let sha = text(f, "sha256")?;
            if sha.len() != 64 || !sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return Err(format!(
                    "{url}: sha256 {sha:?} is not 64 lowercase hex digits"
                ));
            }
            if !matches!(get(f, "size")?, Value::Num(_)) || text(f, "size")?.parse::<u64>().is_err()
            {
                return Err(format!("{url}: size is not a number of bytes"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
