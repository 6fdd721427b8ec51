//! `ring`: inspect a ring config before saving it.
//!
//! `ring owner <config> <topic>...` prints each topic's owner; `ring diff <old> <new>
//! [topic...]` prints the share of the keyspace that moves, per node, and which topics move.

use clap::{Parser, Subcommand};
use ringcast_ring::{Ring, RingDiff};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "ring", version, about = "Inspect ringcast ring configs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the owner of each topic under a ring config.
    Owner {
        /// Ring config file (TOML).
        config: PathBuf,
        /// Topics to place.
        #[arg(required = true)]
        topics: Vec<String>,
    },
    /// Show what moves from one ring config to another.
    Diff {
        /// The ring config in force now.
        old: PathBuf,
        /// The edited ring config.
        new: PathBuf,
        /// Topics to check (optional): prints each one that changes owner.
        topics: Vec<String>,
    },
}

fn load(path: &Path) -> Result<Ring, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    Ring::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Owner { config, topics } => {
            let ring = load(&config)?;
            for topic in topics {
                let node = ring.owner(&topic);
                println!("{topic}\t{}\t{}", node.id, node.addr);
            }
        }
        Command::Diff { old, new, topics } => {
            let (old, new) = (load(&old)?, load(&new)?);
            if new.version() <= old.version() {
                println!(
                    "warning: new version {} is not greater than {}; processes will refuse it",
                    new.version(),
                    old.version()
                );
            }
            let diff = RingDiff::between(&old, &new);
            println!(
                "ring {} -> {}: {:.2}% of the keyspace moves",
                diff.from_version,
                diff.to_version,
                diff.moved * 100.0
            );
            println!(
                "{:<20} {:>8} {:>8} {:>8} {:>8}",
                "node", "before", "after", "gains", "loses"
            );
            for n in &diff.nodes {
                println!(
                    "{:<20} {:>7.2}% {:>7.2}% {:>7.2}% {:>7.2}%",
                    n.id,
                    n.before * 100.0,
                    n.after * 100.0,
                    n.gained * 100.0,
                    n.lost * 100.0
                );
            }
            for topic in &topics {
                let (from, to) = (&old.owner(topic).id, &new.owner(topic).id);
                if from != to {
                    println!("moves\t{topic}\t{from} -> {to}");
                } else {
                    println!("stays\t{topic}\t{from}");
                }
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ring: {e}");
            ExitCode::FAILURE
        }
    }
}
