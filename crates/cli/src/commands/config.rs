use anyhow::Result;

use crate::context::GlobalArgs;

/// Print the effective configuration: built-in defaults, overridden by the
/// configuration file (/etc/lazylayer/config.toml, or --config), overridden
/// by environment variables and flags. The output is in the file's format,
/// every key present, so it can seed a file.
#[derive(clap::Args)]
pub struct Args {
    /// Print JSON on stdout
    #[arg(long)]
    pub json: bool,
}

pub fn run(g: &GlobalArgs, a: Args) -> Result<()> {
    if a.json {
        let out = serde_json::json!({
            "file": g.config_file,
            "config": g.config,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    match &g.config_file {
        Some(f) => println!(
            "# read from {}, with environment and flags applied",
            f.display()
        ),
        None => println!("# no configuration file: defaults, with environment and flags applied"),
    }
    print!("{}", g.config.to_toml());
    Ok(())
}
