use super::*;

/// Tails' real `wiki/src/upgrade/v2/Tails/6.0/amd64/stable/upgrades.yml`
/// (tails.git 874cbb48), written by the generator for 6.9.
const REAL_6_0_STABLE: &str = "---
build-target: amd64
channel: stable
initial-install-version: '6.0'
product-name: Tails
upgrades:
- details-url: https://tails.net/news/version_6.9/
  type: major
  upgrade-paths:
  - target-files:
    - sha256: 3b7140eac01dac3f2013dcfc85f87f9956b51fbf0c9849c6dbd95fb4fd9569dd
      size: 1562804224
      url: https://download.tails.net/tails/stable/tails-amd64-6.9/tails-amd64-6.9.iso
    type: full
  - target-files:
    - sha256: bfb636a13a77b3eee9f96b506c8b946f5f7c59e46e68bf3ce6729c2887f19d2b
      size: 836259840
      url: https://download.tails.net/tails/stable/iuk/v2/Tails_amd64_6.0_to_6.9.iuk
    type: incremental
  version: '6.9'
";

/// Its alpha sibling for 6.0~rc1 (same release).
const REAL_6_0_RC1_ALPHA: &str = "---
build-target: amd64
channel: alpha
initial-install-version: 6.0~rc1
product-name: Tails
upgrades:
- details-url: https://tails.net/news/version_6.9/
  type: major
  upgrade-paths:
  - target-files:
    - sha256: 3b7140eac01dac3f2013dcfc85f87f9956b51fbf0c9849c6dbd95fb4fd9569dd
      size: 1562804224
      url: https://download.tails.net/tails/stable/tails-amd64-6.9/tails-amd64-6.9.iso
    type: full
  - target-files:
    - sha256: ba6ec0dc8cc9dae1217b7f3d381ffc2295a4f864c2d1141cbbecce7d32db5e22
      size: 856608768
      url: https://download.tails.net/tails/stable/iuk/v2/Tails_amd64_6.0~rc1_to_6.9.iuk
    type: incremental
  version: '6.9'
";

/// A UDF with no upgrades yet (6.11, stable).
const REAL_6_11_STABLE: &str = "---
build-target: amd64
channel: stable
initial-install-version: '6.11'
product-name: Tails
";

fn release_6_9() -> Release {
    Release {
        version: "6.9".into(),
        next_versions: vec!["6.10".into(), "6.10~rc1".into(), "6.9.1".into()],
        previous_versions: vec!["6.0~rc1".into(), "6.0".into(), "6.8".into()],
        major: true,
        channel: Channel::Stable,
        build_target: "amd64".into(),
        product_name: "Tails".into(),
    }
}

fn iso_6_9() -> Target {
    Target {
        sha256: "3b7140eac01dac3f2013dcfc85f87f9956b51fbf0c9849c6dbd95fb4fd9569dd".into(),
        size: 1562804224,
    }
}

fn iuks_6_9(name: &str) -> Option<Target> {
    match name {
        "Tails_amd64_6.0_to_6.9.iuk" => Some(Target {
            sha256: "bfb636a13a77b3eee9f96b506c8b946f5f7c59e46e68bf3ce6729c2887f19d2b".into(),
            size: 836259840,
        }),
        "Tails_amd64_6.0~rc1_to_6.9.iuk" => Some(Target {
            sha256: "ba6ec0dc8cc9dae1217b7f3d381ffc2295a4f864c2d1141cbbecce7d32db5e22".into(),
            size: 856608768,
        }),
        _ => None,
    }
}

fn none(_: &Path) -> Result<Option<Vec<u8>>, Error> {
    Ok(None)
}

fn file<'a>(w: &'a [Written], p: &str) -> &'a str {
    let w = w
        .iter()
        .find(|w| w.path == Path::new(p))
        .unwrap_or_else(|| panic!("{p} not written"));
    std::str::from_utf8(&w.bytes).unwrap()
}

#[test]
fn the_real_files_byte_for_byte() {
    let w = generate(&release_6_9(), &iso_6_9(), &iuks_6_9, &none).unwrap();
    let p = |v: &str, c: &str| format!("wiki/src/upgrade/v2/Tails/{v}/amd64/{c}/upgrades.yml");
    assert_eq!(file(&w, &p("6.0", "stable")), REAL_6_0_STABLE);
    assert_eq!(file(&w, &p("6.0~rc1", "alpha")), REAL_6_0_RC1_ALPHA);
    assert_eq!(
        file(&w, &p("6.0~rc1", "stable")),
        REAL_6_0_RC1_ALPHA.replace("channel: alpha", "channel: stable")
    );
    let empty_6_10 = REAL_6_11_STABLE.replace("'6.11'", "'6.10'");
    assert_eq!(file(&w, &p("6.10", "stable")), empty_6_10);
    assert_eq!(
        file(&w, &p("6.10", "alpha")),
        empty_6_10.replace("stable", "alpha")
    );
    // No IUK from 6.8: the full upgrade only.
    assert!(!file(&w, &p("6.8", "stable")).contains("incremental"));
    // A stable release leaves the alpha UDFs of final versions alone.
    assert!(
        w.iter()
            .all(|w| !w.path.ends_with("6.0/amd64/alpha/upgrades.yml"))
    );
    // The order of the generator: the release, the next versions, then
    // the previous ones, alpha before stable.
    let order: Vec<String> = w
        .iter()
        .map(|w| {
            w.path
                .iter()
                .rev()
                .nth(3)
                .unwrap()
                .to_string_lossy()
                .into_owned()
                + "/"
                + &w.path.iter().rev().nth(1).unwrap().to_string_lossy()
        })
        .collect();
    assert_eq!(
        order,
        [
            "6.9/alpha",
            "6.9/stable",
            "6.10/alpha",
            "6.10~rc1/alpha",
            "6.9.1/alpha",
            "6.10/stable",
            "6.10~rc1/stable",
            "6.9.1/stable",
            "6.0~rc1/alpha",
            "6.0~rc1/stable",
            "6.0/stable",
            "6.8/stable"
        ]
    );
}

#[test]
fn an_existing_udf_keeps_its_header_and_loses_its_upgrades() {
    let old = "---\nbuild-target: amd64\nchannel: stable\ninitial-install-version: 6.0\n\
               product-name: Tails\nsomething-else: 1\nupgrades:\n- version: '6.8'\n";
    let existing = |p: &Path| -> Result<Option<Vec<u8>>, Error> {
        Ok(p.ends_with("6.0/amd64/stable/upgrades.yml")
            .then(|| old.as_bytes().to_vec()))
    };
    let w = generate(&release_6_9(), &iso_6_9(), &iuks_6_9, &existing).unwrap();
    let got = file(
        &w,
        "wiki/src/upgrade/v2/Tails/6.0/amd64/stable/upgrades.yml",
    );
    // A plain 6.0 loads as a Perl number: written back plain. Unknown keys
    // go; the upgrades are the new release's only.
    assert_eq!(
        got,
        REAL_6_0_STABLE.replace(
            "initial-install-version: '6.0'",
            "initial-install-version: 6.0"
        )
    );
    let broken = |_: &Path| -> Result<Option<Vec<u8>>, Error> {
        Ok(Some(b"---\nchannel: stable\n".to_vec()))
    };
    let e = generate(&release_6_9(), &iso_6_9(), &iuks_6_9, &broken).unwrap_err();
    assert!(e.to_string().contains("product-name is missing"), "{e}");
}

#[test]
fn an_alpha_release_touches_alpha_udfs_only() {
    let r = Release {
        version: "6.11~rc1".into(),
        next_versions: vec!["6.11".into()],
        previous_versions: vec!["6.10".into()],
        channel: Channel::Alpha,
        ..release_6_9()
    };
    let w = generate(&r, &iso_6_9(), &|_| None, &none).unwrap();
    assert!(
        w.iter()
            .all(|w| !w.path.ends_with("6.10/amd64/stable/upgrades.yml"))
    );
    let got = file(
        &w,
        "wiki/src/upgrade/v2/Tails/6.10/amd64/alpha/upgrades.yml",
    );
    assert!(
        got.contains("details-url: https://tails.net/news/test_6.11-rc1/\n"),
        "{got}"
    );
    assert!(got.contains(
        "url: https://download.tails.net/tails/alpha/tails-amd64-6.11~rc1/tails-amd64-6.11~rc1.iso\n"
    ));
    assert!(got.ends_with("  version: 6.11~rc1\n"), "{got}");
}

#[test]
fn names_that_would_leave_the_checkout_are_refused() {
    for bad in ["../6.0", "6.0/x", "", "6 0", ".."] {
        let r = Release {
            previous_versions: vec![bad.into()],
            ..release_6_9()
        };
        assert!(
            generate(&r, &iso_6_9(), &iuks_6_9, &none).is_err(),
            "{bad:?}"
        );
    }
    let r = Release {
        next_versions: vec![],
        ..release_6_9()
    };
    assert!(r.check().is_err());
}

#[test]
fn check_takes_the_real_file_and_names_what_an_upgrader_would_trip_on() {
    let p = Path::new("upgrades.yml");
    check(p, REAL_6_0_STABLE.as_bytes()).unwrap();
    check(p, REAL_6_11_STABLE.as_bytes()).unwrap();
    for (from, to, why) in [
        ("https://download", "http://download", "is not https"),
        (
            "size: 836259840",
            "size: '836259840'",
            "size is not a number",
        ),
        ("sha256: bfb6", "sha256: BFB6", "not 64 lowercase hex"),
        ("type: major", "type: huge", "neither major nor minor"),
        ("product-name: Tails\n", "", "product-name is missing"),
        ("upgrades:\n", "upgrades: 1\nx:\n", "upgrades is not a list"),
        (
            "channel: stable",
            "channel: ~",
            "channel is not a defined scalar",
        ),
    ] {
        let bad = REAL_6_0_STABLE.replacen(from, to, 1);
        let e = check(p, bad.as_bytes()).unwrap_err().to_string();
        assert!(e.contains(why), "{from} -> {to}: {e}");
    }
    assert!(check(p, b"  \n").is_err());
    assert!(check(p, b"- a\n").is_err());
    assert!(check(p, b"{{{").is_err());
}

#[test]
fn nested_aliases_are_refused_before_they_are_expanded() {
    let p = Path::new("upgrades.yml");
    // Nine levels of ten aliases: 10^9 nodes if loaded.
    let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..9 {
        let prev = format!("*a{}", i - 1);
        bomb += &format!("a{i}: &a{i} [{}]\n", vec![prev; 10].join(", "));
    }
    let doc = REAL_6_0_STABLE.to_string() + &bomb;
    let e = check(p, doc.as_bytes()).unwrap_err().to_string();
    assert!(e.contains("aliases are expanded"), "{e}");
    // A few aliases are YAML like any other.
    let doc = REAL_6_0_STABLE.to_string() + "x: &x [1, 2]\ny: [*x, *x]\n";
    check(p, doc.as_bytes()).unwrap();
    let big = REAL_6_0_STABLE.to_string() + &"#".repeat(MAX_UDF_BYTES);
    assert!(
        check(p, big.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("not a UDF")
    );
}
