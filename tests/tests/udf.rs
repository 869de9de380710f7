//! `iukfarm udf` against Tails' generator re-enacted in Perl with YAML::XS
//! (`reference/udf-generate.pl`), against sqv, gpg and sqop (what Tails 7's
//! CI and Upgrader run, as sqopv, against the full and the minimal export of
//! the key) for the signatures,
//! and fed from the farm's signed manifest.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use iukfarm_tests::farm::{AgentGuard, Archive, gpg, signed_release};
use iukfarm_tests::{iukfarm, require_tool, run};

/// Every file under `dir`, by relative path.
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn copy_tree(from: &Path, to: &Path) {
    for (p, bytes) in tree(from) {
        let dest = to.join(p);
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        fs::write(dest, bytes).unwrap();
    }
}

fn udf(path: &str) -> String {
    format!("wiki/src/upgrade/v2/Tails/{path}/upgrades.yml")
}

/// A website checkout as Tails' holds one: UDFs written by earlier runs
/// (quoted and plain versions, a key the generator drops, old upgrades).
fn checkout(dir: &Path) {
    let files = [
        (
            udf("7.0/amd64/stable"),
            "---\nbuild-target: amd64\nchannel: stable\ninitial-install-version: '7.0'\n\
             product-name: Tails\nupgrades:\n- details-url: https://tails.net/news/version_7.1/\n  \
             type: major\n  upgrade-paths: []\n  version: '7.1'\n",
        ),
        (
            udf("7.1/amd64/stable"),
            "---\nbuild-target: amd64\nchannel: stable\ninitial-install-version: 7.1\n\
             product-name: Tails\nnote: hand-written\n",
        ),
        (
            udf("7.0~rc1/amd64/alpha"),
            "---\nbuild-target: amd64\nchannel: alpha\ninitial-install-version: 7.0~rc1\n\
             product-name: Tails\n",
        ),
        (
            udf("7.0/amd64/alpha"),
            "---\nbuild-target: amd64\nchannel: alpha\ninitial-install-version: '7.0'\n\
             product-name: Tails\n",
        ),
    ];
    for (p, text) in files {
        let p = dir.join(p);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }
}

/// Files with the ISO's and IUKs' names: the generator only hashes them.
fn inputs(dir: &Path, version: &str, iuks_from: &[&str]) -> (PathBuf, PathBuf) {
    let iso = dir.join(format!("tails-amd64-{version}.iso"));
    fs::write(&iso, vec![0x5a; 300_000]).unwrap();
    let iuks = dir.join("iuks");
    fs::create_dir_all(&iuks).unwrap();
    for (n, prev) in iuks_from.iter().enumerate() {
        fs::write(
            iuks.join(format!("Tails_amd64_{prev}_to_{version}.iuk")),
            vec![n as u8; 1000 + n],
        )
        .unwrap();
    }
    (iso, iuks)
}

/// `iukfarm udf generate` into `checkout`, sizes and digests from the files.
fn generate_cmd(program: Command, checkout: &Path, iso: &Path, iuks: &Path) -> Command {
    let mut c = program;
    c.args(["udf", "generate", "--release-checkout"])
        .arg(checkout)
        .arg("--iso")
        .arg(iso)
        .arg("--iuks")
        .arg(iuks);
    c
}

fn ours(checkout: &Path, iso: &Path, iuks: &Path, args: &[&str]) -> Output {
    let mut c = generate_cmd(Command::new(iukfarm()), checkout, iso, iuks);
    for a in args {
        match a.strip_prefix("--") {
            Some(opt) => c.arg(format!("--{}", opt.replace('_', "-"))),
            None => c.arg(a),
        };
    }
    run(&mut c)
}

fn reference(checkout: &Path, iso: &Path, iuks: &Path, args: &[&str]) {
    require_tool("perl");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("reference/udf-generate.pl");
    run(Command::new("perl")
        .arg(script)
        .arg("--release_checkout")
        .arg(checkout)
        .arg("--iso")
        .arg(iso)
        .arg("--iuks")
        .arg(iuks)
        .args(args));
}

/// The next major's pre-releases Tails 7's release process always passes
/// as next versions.
const NEXT_MAJOR: [&str; 6] = [
    "8.0~beta1",
    "8.0~beta2",
    "8.0~beta3",
    "8.0~rc1",
    "8.0~rc2",
    "8.0~rc3",
];

/// Options as the generator spells them (ours takes the same with `-`).
fn release_args<'a>(
    version: &'a str,
    channel: &'a str,
    next: &[&'a str],
    prev: &[&'a str],
) -> Vec<&'a str> {
    let mut v = vec![
        "--version",
        version,
        "--channel",
        channel,
        "--major_release",
    ];
    for n in next {
        v.extend(["--next_version", n]);
    }
    for p in prev {
        v.extend(["--previous_version", p]);
    }
    v
}

#[test]
fn generate_writes_what_the_generator_writes_byte_for_byte() {
    let d = tempfile::tempdir().unwrap();
    let start = d.path().join("start");
    checkout(&start);
    for (version, channel, next, prev, iuks_from) in [
        (
            "7.2",
            "stable",
            vec!["7.3", "8.0", "8.0~rc1", "7.2.1"],
            vec!["7.0~rc1", "7.0", "7.1", "7.10", "6.19"],
            vec!["7.0~rc1", "7.0", "7.1"],
        ),
        (
            "8.0~rc1",
            "alpha",
            vec!["8.0", "8.1"],
            vec!["7.0", "7.0~rc1", "7.1"],
            vec!["7.0", "7.1"],
        ),
        // Tails 7's release process: every (N+1).0~{beta,rc}{1,2,3} besides
        // the real next versions; a major's first RC has no IUK at all
        // (its previous major's UDFs get the full ISO only).
        (
            "7.0~rc1",
            "alpha",
            [&["7.0~rc2", "7.0"][..], &NEXT_MAJOR].concat(),
            vec!["6.18", "6.19"],
            vec![],
        ),
        (
            "7.6.1",
            "stable",
            [&["7.6.2", "7.7"][..], &NEXT_MAJOR].concat(),
            vec!["7.0~rc1", "7.0~rc2", "7.0", "7.3.1", "7.6", "6.19"],
            vec!["7.0~rc1", "7.0~rc2", "7.0", "7.3.1", "7.6"],
        ),
    ] {
        let dir = d.path().join(version);
        let (a, b) = (dir.join("ours"), dir.join("reference"));
        copy_tree(&start, &a);
        copy_tree(&start, &b);
        let (iso, iuks) = inputs(&dir, version, &iuks_from);
        let args = release_args(version, channel, &next, &prev);
        let out = ours(&a, &iso, &iuks, &args);
        reference(&b, &iso, &iuks, &args);
        let (ta, tb) = (tree(&a), tree(&b));
        assert_eq!(
            ta.keys().collect::<Vec<_>>(),
            tb.keys().collect::<Vec<_>>(),
            "{version}: the same files"
        );
        for (p, bytes) in &ta {
            assert_eq!(
                String::from_utf8_lossy(bytes),
                String::from_utf8_lossy(&tb[p]),
                "{version}: {}",
                p.display()
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("not signed"), "{stdout}");
    }
}

#[test]
fn signed_udfs_verify_with_sqv_and_gpg_and_check_names_what_is_wrong() {
    require_tool("sqv");
    let g = gpg();
    let d = tempfile::tempdir().unwrap();
    let co = d.path().join("checkout");
    checkout(&co);
    let (iso, iuks) = inputs(d.path(), "7.2", &["7.1"]);
    let args = release_args("7.2", "stable", &["7.3"], &["7.1", "7.0"]);
    let mut signed = args.clone();
    let key = g.secret_key.to_str().unwrap();
    signed.extend(["--signing_key", key]);
    let out = ours(&co, &iso, &iuks, &signed);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("6 UDFs written, 6 signed; every signature checked"),
        "{stdout}"
    );

    let files: Vec<PathBuf> = [
        "7.2/amd64/alpha",
        "7.2/amd64/stable",
        "7.3/amd64/alpha",
        "7.3/amd64/stable",
        "7.1/amd64/stable",
        "7.0/amd64/stable",
    ]
    .iter()
    .map(|p| co.join(udf(p)))
    .collect();
    for f in &files {
        let sig = PathBuf::from(format!("{}.pgp", f.display()));
        assert!(
            fs::read_to_string(&sig)
                .unwrap()
                .starts_with("-----BEGIN PGP SIGNATURE-----"),
            "armored, as gpg --armor --detach-sign writes"
        );
        run(Command::new("sqv")
            .arg("--keyring")
            .arg(&g.cert)
            .arg(&sig)
            .arg(f));
        let v = run(g.cmd("gpg").args(["--batch", "--verify"]).arg(&sig).arg(f));
        assert!(String::from_utf8_lossy(&v.stderr).contains("Good signature"));
        g.sop_verify(&sig, f);
    }
    let check = |files: &[PathBuf]| {
        Command::new(iukfarm())
            .args(["udf", "check", "--cert"])
            .arg(&g.cert)
            .args(files)
            .output()
            .unwrap()
    };
    let ok = check(&files);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    // Unchanged files keep their signatures.
    let sig_7_0 = co.join(format!("{}.pgp", udf("7.0/amd64/stable")));
    let before = fs::read(&sig_7_0).unwrap();
    let again = ours(&co, &iso, &iuks, &signed);
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(stdout.contains("6 UDFs written, 0 signed"), "{stdout}");
    assert_eq!(fs::read(&sig_7_0).unwrap(), before);

    // A changed byte, a missing signature, an http URL: named, exit 1.
    let f = co.join(udf("7.0/amd64/stable"));
    let text = fs::read_to_string(&f).unwrap();
    fs::write(&f, text.replace("size: 300000", "size: 300001")).unwrap();
    let bad = check(&files);
    let e = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1), "{e}");
    assert!(
        e.contains(&format!("{}: ", f.display())) && e.contains("1 of 6"),
        "{e}"
    );
    fs::write(&f, text.replace("https://download", "http://download")).unwrap();
    let e = String::from_utf8_lossy(&check(&files).stderr).into_owned();
    assert!(e.contains("is not https"), "{e}");

    // Through the RM's gpg (agent, smartcard): the same checks hold.
    let _agent = AgentGuard(g);
    let co2 = d.path().join("checkout-gpg");
    checkout(&co2);
    let mut c = generate_cmd(g.cmd(iukfarm().to_str().unwrap()), &co2, &iso, &iuks);
    c.args([
        "--version",
        "7.2",
        "--next-version",
        "7.3",
        "--previous-version",
        "7.1",
    ])
    .args(["--gpg-key", &g.fingerprint]);
    let o = run(&mut c);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("5 UDFs written, 5 signed; every signature checked"),
        "{stdout}"
    );
    let f = co2.join(udf("7.1/amd64/stable"));
    run(Command::new("sqv")
        .arg("--keyring")
        .arg(&g.cert)
        .arg(format!("{}.pgp", f.display()))
        .arg(&f));
    // gpg signs with the signing subkey: the minimal export verifies it too.
    g.sop_verify(Path::new(&format!("{}.pgp", f.display())), &f);

    // A key that cannot sign (a public certificate) is bad usage, found
    // before anything is written.
    let before = tree(&co);
    let no_key = generate_cmd(Command::new(iukfarm()), &co, &iso, &iuks)
        .args(["--version", "7.2", "--next-version", "7.3", "--signing-key"])
        .arg(&g.cert)
        .output()
        .unwrap();
    assert_eq!(no_key.status.code(), Some(2));
    assert_eq!(tree(&co), before);
}

#[test]
fn from_the_farms_signed_manifest_without_hashing_the_same_bytes() {
    let a = Archive::make_with(3, &["--layout", "6"]);
    let g = gpg();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("release");
    signed_release(&a, &out);
    let iso = a.iso("6.2");
    let args = [
        "--version",
        "6.2",
        "--next-version",
        "6.3",
        "--previous-version",
        "6.0",
    ];
    let (x, y) = (d.path().join("x"), d.path().join("y"));
    fs::create_dir_all(&x).unwrap();
    fs::create_dir_all(&y).unwrap();
    let from_files = generate_cmd(Command::new(iukfarm()), &x, &iso, &out)
        .args(args)
        .args(["--previous-version", "6.1"])
        .output()
        .unwrap();
    assert!(from_files.status.success());
    let from_manifest = |extra: &[&str]| {
        Command::new(iukfarm())
            .args(["udf", "generate", "--release-checkout"])
            .arg(&y)
            .arg("--manifest")
            .arg(out.join("manifest.json"))
            .arg("--cert")
            .arg(&g.cert)
            .args(args)
            .args(extra)
            .output()
            .unwrap()
    };
    let m = from_manifest(&["--previous-version", "6.1"]);
    assert!(m.status.success(), "{}", String::from_utf8_lossy(&m.stderr));
    assert_eq!(tree(&x), tree(&y));
    assert!(
        String::from_utf8_lossy(&tree(&y)[Path::new(&udf("6.0/amd64/stable"))])
            .contains("Tails_amd64_6.0_to_6.2.iuk")
    );

    // A manifest whose signature does not hold is refused, nothing written.
    fs::write(
        out.join("manifest.json"),
        fs::read_to_string(out.join("manifest.json"))
            .unwrap()
            .replacen("\"size\": ", "\"size\": 1", 1),
    )
    .unwrap();
    let before = tree(&y);
    let bad = from_manifest(&["--previous-version", "6.1"]);
    assert_eq!(
        bad.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    assert_eq!(tree(&y), before);
}

#[test]
fn the_release_writes_and_signs_its_udfs_once_signed() {
    require_tool("sqv");
    let a = Archive::make_with(3, &["--layout", "6"]);
    let g = gpg();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("release");
    let web = d.path().join("website");
    fs::create_dir_all(&web).unwrap();
    let release = |extra: &[&str]| {
        Command::new(iukfarm())
            .arg("release")
            .args(["--new-version", a.new_version()])
            .args(["--source-versions", &a.sources().join(" ")])
            .args(["--source-date-epoch", iukfarm_tests::farm::SDE])
            .arg("--iso-root")
            .arg(a.root())
            .arg("--output-dir")
            .arg(&out)
            .arg("--signing-key")
            .arg(&g.secret_key)
            .arg("--udf-dir")
            .arg(&web)
            .args(["--udf-next-version", "6.3", "--udf-major-release"])
            .args(extra)
            .output()
            .unwrap()
    };

    // An existing UDF the generator could not load: refused before any
    // work, nothing written anywhere.
    let broken = web.join(udf("6.0/amd64/stable"));
    fs::create_dir_all(broken.parent().unwrap()).unwrap();
    fs::write(&broken, "---\nupgrades: [unclosed\n").unwrap();
    let r = release(&[]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--udf-dir") && err.contains("upgrades.yml"),
        "{err}"
    );
    assert!(!out.exists(), "the release did not start");
    fs::remove_file(&broken).unwrap();

    let r = release(&[]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    // The same bytes as the generator, run on the kits the release wrote.
    let expected = d.path().join("expected");
    fs::create_dir_all(&expected).unwrap();
    reference(
        &expected,
        &a.iso(a.new_version()),
        &out,
        &release_args(a.new_version(), "stable", &["6.3"], &["6.0", "6.1"]),
    );
    let ours = tree(&web);
    let ymls: BTreeMap<_, _> = ours
        .iter()
        .filter(|(p, _)| p.extension().is_some_and(|e| e == "yml"))
        .map(|(p, b)| (p.clone(), b.clone()))
        .collect();
    assert_eq!(ymls, tree(&expected));
    assert!(
        String::from_utf8_lossy(&ymls[Path::new(&udf("6.1/amd64/stable"))])
            .contains("Tails_amd64_6.1_to_6.2.iuk")
    );
    for p in ymls.keys() {
        let mut sig = web.join(p).into_os_string();
        sig.push(".pgp");
        run(Command::new("sqv")
            .arg("--keyring")
            .arg(&g.cert)
            .arg(&sig)
            .arg(web.join(p)));
        g.sop_verify(Path::new(&sig), &web.join(p));
    }
    // Run again: resumed from the journal, the UDFs unchanged, not signed again.
    let r = release(&[]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stdout).contains("0 signed"));
    assert_eq!(tree(&web), ours);

    // Tails' key stays with the RM: the farm writes the same UDFs unsigned
    // and says how to sign them; `udf sign` on the RM's machine does.
    fs::remove_dir_all(&web).unwrap();
    fs::create_dir_all(&web).unwrap();
    let r = release(&["--udf-unsigned"]);
    let said = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(
        said.contains("not signed") && said.contains("udf sign"),
        "{said}"
    );
    let unsigned = tree(&web);
    assert_eq!(unsigned, ymls, "the same UDFs, and no signature");
    let sign = run(Command::new(iukfarm())
        .args(["udf", "sign", "--signing-key"])
        .arg(&g.secret_key)
        .arg(&web));
    let said = String::from_utf8_lossy(&sign.stdout);
    assert!(
        said.contains(&format!("{} UDFs: {} signed", ymls.len(), ymls.len())),
        "{said}"
    );
    // (OpenPGP signatures are salted: checked, not compared.)
    for p in ymls.keys() {
        let mut sig = web.join(p).into_os_string();
        sig.push(".pgp");
        run(Command::new("sqv")
            .arg("--keyring")
            .arg(&g.cert)
            .arg(&sig)
            .arg(web.join(p)));
    }
}

#[test]
fn udf_sign_signs_what_has_no_good_signature_and_checks_everything() {
    require_tool("sqv");
    let g = gpg();
    let d = tempfile::tempdir().unwrap();
    let co = d.path().join("checkout");
    checkout(&co);
    let (iso, iuks) = inputs(d.path(), "7.2", &["7.1"]);
    let args = release_args("7.2", "stable", &["7.3"], &["7.1", "7.0"]);
    // Written unsigned, as the farm writes them with --udf-unsigned.
    let out = ours(&co, &iso, &iuks, &args);
    assert!(String::from_utf8_lossy(&out.stdout).contains("not signed"));
    let udfs = co.join("wiki/src/upgrade/v2");
    let sign = |what: &[&Path]| {
        let mut c = Command::new(iukfarm());
        c.args(["udf", "sign", "--signing-key"]).arg(&g.secret_key);
        c.args(what).output().unwrap()
    };
    // Every UDF of the checkout: the release's and those already there.
    let n = tree(&udfs)
        .keys()
        .filter(|p| p.ends_with("upgrades.yml"))
        .count();
    let first = sign(&[&udfs]);
    let said = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(said.contains(&format!("{n} UDFs: {n} signed")), "{said}");
    let f = co.join(udf("7.0/amd64/stable"));
    let sig = PathBuf::from(format!("{}.pgp", f.display()));
    run(Command::new("sqv")
        .arg("--keyring")
        .arg(&g.cert)
        .arg(&sig)
        .arg(&f));
    g.sop_verify(&sig, &f);

    // Again: every signature good, nothing signed.
    let before = tree(&co);
    let again = sign(&[&udfs]);
    let said = String::from_utf8_lossy(&again.stdout);
    assert!(said.contains(&format!("{n} UDFs: 0 signed")), "{said}");
    assert_eq!(tree(&co), before);

    // A UDF changed since (the RM edited it): signed again, that one only.
    let text = fs::read_to_string(&f).unwrap();
    fs::write(&f, text.replace("size: 300000", "size: 300001")).unwrap();
    let third = sign(&[&f]);
    assert!(String::from_utf8_lossy(&third.stdout).contains("1 UDFs: 1 signed"));
    run(Command::new("sqv")
        .arg("--keyring")
        .arg(&g.cert)
        .arg(&sig)
        .arg(&f));

    // No key that can sign, a path that is not there: exit 2, nothing written.
    let before = tree(&co);
    let no_key = Command::new(iukfarm())
        .args(["udf", "sign", "--signing-key"])
        .arg(&g.cert)
        .arg(&udfs)
        .output()
        .unwrap();
    assert_eq!(no_key.status.code(), Some(2));
    let missing = sign(&[&d.path().join("nope")]);
    assert_eq!(missing.status.code(), Some(2));
    assert_eq!(tree(&co), before);
}
