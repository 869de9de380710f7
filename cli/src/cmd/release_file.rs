//! `--release-file FILE` of `coordinator` and `release`: a TOML file whose
//! keys are the command's long options, with the same values. There is one
//! definition of the settings, clap's: the file is turned into options put
//! before the command line's, which override them (lists add up, as
//! repeated options do). A key that is not an option of the command is
//! refused, naming it.

use std::ffi::OsString;
use std::path::Path;

use clap::Command;

/// The subcommands that take a release file.
const TAKE_IT: [&str; 2] = ["coordinator", "release"];

/// `argv` with the release file's settings inserted after the subcommand;
/// unchanged when there is no `--release-file`. `Err` is a message for the
/// user (a usage error: exit 2).
pub fn expand(argv: Vec<OsString>, cli: &Command) -> Result<Vec<OsString>, String> {
    // The subcommand is the first word that is not an option (the global
    // ones take no value), not a value that happens to read "release".
    let Some(at) = (argv.iter().enumerate().skip(1))
        .find(|(_, a)| !a.to_string_lossy().starts_with('-'))
        .map(|(i, _)| i)
        .filter(|&i| TAKE_IT.iter().any(|c| argv[i] == *c))
    else {
        return Ok(argv);
    };
    let mut path = None;
    for (i, a) in argv.iter().enumerate().skip(at + 1) {
        let a = a.to_string_lossy();
        if a == "--" {
            break;
        }
        if a == "--release-file" {
            path = argv.get(i + 1).cloned();
        } else if let Some(p) = a.strip_prefix("--release-file=") {
            path = Some(p.into());
        }
    }
    let Some(path) = path else {
        return Ok(argv);
    };
    let name = argv[at].to_string_lossy().into_owned();
    let sub = cli
        .find_subcommand(&name)
        .ok_or_else(|| format!("no subcommand {name}"))?;
    let settings = settings(Path::new(&path), sub)?;
    let mut out = argv[..=at].to_vec();
    out.extend(settings);
    out.extend_from_slice(&argv[at + 1..]);
    Ok(out)
}

/// The options a release file stands for.
fn settings(path: &Path, cmd: &Command) -> Result<Vec<OsString>, String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("release file {shown}: {e}"))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| format!("{shown}: {e}"))?;
    let mut out = Vec::new();
    for (key, value) in &table {
        let arg = (cmd.get_arguments())
            .filter(|a| !a.is_hide_set() && key != "release-file" && key != "help")
            .find(|a| {
                a.get_long() == Some(key)
                    || a.get_all_aliases()
                        .is_some_and(|l| l.contains(&key.as_str()))
            })
            .ok_or_else(|| {
                format!(
                    "{shown}: unknown setting {key:?}: a release file takes the long options of \
                     `iukfarm {} --help`, without their dashes",
                    cmd.get_name()
                )
            })?;
        let long = arg.get_long().expect("found by its long name");
        let takes_value = arg.get_action().takes_values();
        let many = matches!(arg.get_action(), clap::ArgAction::Append);
        let scalar = |v: &toml::Value| -> Result<String, String> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(n) => Ok(n.to_string()),
                toml::Value::Boolean(b) => Ok(b.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                _ => Err(format!(
                    "{shown}: {key}: expected a string, a number or a list of them"
                )),
            }
        };
        match value {
            toml::Value::Boolean(b) if !takes_value => {
                if *b {
                    out.push(format!("--{long}").into());
                }
            }
            _ if !takes_value => {
                return Err(format!("{shown}: {key} is a switch: true or false"));
            }
            toml::Value::Array(items) if many => {
                for v in items {
                    out.push(format!("--{long}={}", scalar(v)?).into());
                }
            }
            // One option holding a list (source-versions): its items
            // separated by spaces, as on the command line.
            toml::Value::Array(items) => {
                let items: Vec<String> = items.iter().map(scalar).collect::<Result<_, _>>()?;
                out.push(format!("--{long}={}", items.join(" ")).into());
            }
            v => out.push(format!("--{long}={}", scalar(v)?).into()),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn cli() -> Command {
        crate::Cli::command()
    }

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    /// A value each option accepts, as it would be written in a file.
    fn sample(long: &str) -> Option<toml::Value> {
        use toml::Value as V;
        let s = |x: &str| V::String(x.into());
        Some(match long {
            "source-date-epoch" => V::Integer(1_730_285_444),
            "source-versions" => V::Array(vec![s("7.0"), s("7.1")]),
            "profile" => s("fast"),
            "gensquashfs" => s("1.3.2"),
            "engine-option" => V::Array(vec![s("ignore-if-same-content=a/*")]),
            "require-engine" => s("0.1.0"),
            "reproduce" => s("2"),
            "lease-timeout" | "linger" => s("45s"),
            "max-attempts" | "verify-jobs" | "workers" => V::Integer(3),
            "threads" => V::Integer(2),
            "block-store-size" | "block-cache-size" => s("2G"),
            "listen" => s("127.0.0.1:7000"),
            "udf-next-version" | "udf-previous-version" => V::Array(vec![s("7.3")]),
            "udf-channel" => s("alpha"),
            "kernel-check" => s("off"),
            "new-version" => s("7.2"),
            "release-file" | "help" | "verbose" => return None,
            _ => s("some/where"),
        })
    }

    /// The same settings as options on the command line.
    fn as_flags(long: &str, v: &toml::Value) -> Vec<String> {
        match v {
            toml::Value::Boolean(true) => vec![format!("--{long}")],
            toml::Value::Array(items) if long == "source-versions" => vec![
                format!("--{long}"),
                (items.iter())
                    .map(|i| i.as_str().unwrap().to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
            ],
            toml::Value::Array(items) => (items.iter())
                .flat_map(|i| [format!("--{long}"), i.as_str().unwrap().to_string()])
                .collect(),
            toml::Value::Integer(n) => vec![format!("--{long}"), n.to_string()],
            toml::Value::String(s) => vec![format!("--{long}"), s.clone()],
            _ => unreachable!(),
        }
    }

    /// Every visible long option of `coordinator` and `release` can be set
    /// in a release file, and the file gives what the options give.
    #[test]
    fn a_release_file_sets_every_option_as_the_command_line_does() {
        let d = tempfile::tempdir().unwrap();
        for name in TAKE_IT {
            let cmd = cli().find_subcommand(name).unwrap().clone();
            let mut table = toml::Table::new();
            let mut flags = vec!["iukfarm".to_string(), name.to_string()];
            for a in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
                let Some(long) = a.get_long() else { continue };
                let Some(mut v) = sample(long) else { continue };
                if !a.get_action().takes_values() {
                    v = toml::Value::Boolean(true);
                }
                // tls-client-ca and token-file exclude nothing; --signing-key
                // and --gpg-key do: only one of them.
                if long == "gpg-key" {
                    continue;
                }
                flags.extend(as_flags(long, &v));
                table.insert(long.to_string(), v);
            }
            let file = d.path().join(format!("{name}.toml"));
            std::fs::write(&file, toml::to_string(&table).unwrap()).unwrap();
            let from_file = expand(
                os(&["iukfarm", name, "--release-file", file.to_str().unwrap()]),
                &cli(),
            )
            .unwrap();
            let parse = |argv: Vec<OsString>| {
                let m = cli().try_get_matches_from(argv).unwrap();
                let (_, sub) = m.subcommand().unwrap();
                // Every option's values, by id (the release file's path aside).
                // (Argument groups, named after their structs, aside.)
                let mut seen: Vec<(String, Vec<String>)> = (sub.ids())
                    .filter(|id| id.as_str() != "release_file")
                    .filter(|id| id.as_str().starts_with(|c: char| c.is_lowercase()))
                    .map(|id| {
                        let vals = (sub.get_raw(id.as_str()).into_iter().flatten())
                            .map(|v| v.to_string_lossy().into_owned())
                            .collect();
                        (id.to_string(), vals)
                    })
                    .collect();
                seen.sort();
                seen
            };
            let flags: Vec<OsString> = flags.iter().map(OsString::from).collect();
            assert_eq!(parse(from_file), parse(flags), "{name}");
            assert!(table.len() > 20, "{name}: only {} settings", table.len());
        }
    }

    #[test]
    fn the_command_line_overrides_the_file_and_lists_add_up() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("r.toml");
        std::fs::write(
            &file,
            "new-version = \"7.2\"\nsource-versions = \"7.0, 7.1\"\n\
             engine-option = [\"a=1\"]\nlinger = \"1m\"\n",
        )
        .unwrap();
        let argv = expand(
            os(&[
                "iukfarm",
                "-v",
                "coordinator",
                "--release-file",
                file.to_str().unwrap(),
                "--new-version",
                "7.3",
                "--engine-option",
                "b=2",
            ]),
            &cli(),
        )
        .unwrap();
        let m = cli().try_get_matches_from(argv).unwrap();
        let (_, sub) = m.subcommand().unwrap();
        let one = |id: &str| sub.get_one::<String>(id).cloned();
        assert_eq!(one("new_version").as_deref(), Some("7.3"));
        assert_eq!(one("source_versions").as_deref(), Some("7.0, 7.1"));
        let opts: Vec<&String> = sub.get_many("engine_options").unwrap().collect();
        assert_eq!(opts, ["a=1", "b=2"]);
    }

    #[test]
    fn unknown_keys_and_wrong_values_are_refused_naming_them() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("r.toml");
        for (text, said) in [
            ("new-verison = \"7.2\"\n", "unknown setting \"new-verison\""),
            ("test-lie-blocks = true\n", "unknown setting"),
            ("release-file = \"x\"\n", "unknown setting"),
            ("udf-major-release = \"yes\"\n", "is a switch"),
            ("iso-root = { a = 1 }\n", "expected a string"),
            ("new-version = \n", "TOML"),
        ] {
            std::fs::write(&file, text).unwrap();
            let e = expand(
                os(&[
                    "iukfarm",
                    "release",
                    "--release-file",
                    file.to_str().unwrap(),
                ]),
                &cli(),
            )
            .unwrap_err();
            assert!(e.contains(said), "{text}: {e}");
        }
        let e = expand(
            os(&["iukfarm", "coordinator", "--release-file=/nope"]),
            &cli(),
        )
        .unwrap_err();
        assert!(e.contains("/nope"), "{e}");
        // Another subcommand, whatever its values read: left to clap.
        let other = os(&[
            "iukfarm",
            "-v",
            "worker",
            "--name",
            "release",
            "--release-file=/x",
        ]);
        assert_eq!(expand(other.clone(), &cli()).unwrap(), other);
    }

    #[test]
    fn the_shipped_example_is_a_valid_release_file() {
        let argv = expand(
            os(&[
                "iukfarm",
                "coordinator",
                "--release-file",
                concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/release.toml.example"),
            ]),
            &cli(),
        )
        .unwrap();
        let m = cli().try_get_matches_from(argv).unwrap();
        let (_, sub) = m.subcommand().unwrap();
        assert_eq!(
            sub.get_one::<String>("reproduce").map(String::as_str),
            Some("2")
        );
    }
}
