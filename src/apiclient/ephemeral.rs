//! `apiclient ephemeral-storage init [-t|--filesystem ext4|xfs] [--disks DISK...]`,
//! `bind --dirs DIR...`, `list-disks [-f text|json]`, `list-dirs [-f text|json]`: Bottlerocket's
//! subcommand, on its routes (`/actions/ephemeral-storage/*`; the server: `crate::ephemeral`).

use serde_json::json;

use super::{usage, Client, Error, Result};

const BASE: &str = "/actions/ephemeral-storage";

pub fn run(client: &Client, args: &[String]) -> Result<()> {
    let Some((cmd, rest)) = args.split_first() else {
        return usage("ephemeral-storage needs init, bind, list-disks or list-dirs");
    };
    match cmd.as_str() {
        "init" => {
            let (mut fs, mut disks) = (None, None::<Vec<String>>);
            let mut it = rest.iter().peekable();
            while let Some(a) = it.next() {
                match a.as_str() {
                    "-t" | "--filesystem" => {
                        fs = Some(match it.next().map(String::as_str) {
                            Some("ext4") => "Ext4",
                            Some("xfs") => "Xfs",
                            other => return usage(format!("{a} takes ext4 or xfs, not {other:?}")),
                        })
                    }
                    "--disks" => {
                        let mut d = vec![];
                        while let Some(x) = it.next_if(|x| !x.starts_with('-')) {
                            d.push(x.clone());
                        }
                        if d.is_empty() {
                            return usage("--disks needs at least one disk");
                        }
                        disks = Some(d);
                    }
                    other => return usage(format!("ephemeral-storage init: unexpected argument '{other}'")),
                }
            }
            let body = json!({"filesystem": fs, "disks": disks}).to_string();
            call(client, "POST", &format!("{BASE}/init"), Some(&body))
        }
        "bind" => {
            let dirs = match rest.split_first() {
                Some((flag, dirs)) if flag == "--dirs" && !dirs.is_empty() => dirs,
                _ => return usage("ephemeral-storage bind --dirs DIR..."),
            };
            let body = json!({ "targets": dirs }).to_string();
            call(client, "POST", &format!("{BASE}/bind"), Some(&body))
        }
        "list-disks" | "list-dirs" => {
            let uri = match rest {
                [] => format!("{BASE}/{cmd}"),
                [f, fmt] if f == "-f" || f == "--format" => format!("{BASE}/{cmd}?format={fmt}"),
                _ => return usage(format!("ephemeral-storage {cmd} [-f text|json]")),
            };
            call(client, "GET", &uri, None)
        }
        other => {
            usage(format!("ephemeral-storage: unknown command '{other}' (init, bind, list-disks, list-dirs)"))
        }
    }
}

fn call(client: &Client, method: &str, uri: &str, body: Option<&str>) -> Result<()> {
    let out = client.call(method, uri, body).map_err(|e| Error::Failed(e.to_string()))?;
    print!("{out}");
    Ok(())
}
