//! How every Weft binary logs: to stderr, coloured only when stderr is a terminal (and
//! `NO_COLOR` is unset), or as one JSON object per line for log pipelines
//! (`--log-format json`).

use std::io::IsTerminal;

/// The shape of log lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines; ANSI colour only on a terminal.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`, `spans`).
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?} is not a log format: use text or json")),
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// Whether text logs on stderr should carry ANSI colour: a terminal, and no `NO_COLOR`.
pub fn colour_on_stderr() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Installs the process-wide subscriber: `filter` in tracing env-filter syntax (an invalid
/// one falls back to `fallback`, and says so on the first line), lines in `format` on stderr.
pub fn init(filter: &str, fallback: &str, format: LogFormat) {
    let (env_filter, bad) = match tracing_subscriber::EnvFilter::try_new(filter) {
        Ok(f) => (f, None),
        Err(e) => (tracing_subscriber::EnvFilter::new(fallback), Some(e)),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder.with_ansi(colour_on_stderr()).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(false)
            .with_current_span(true)
            .try_init(),
    };
    if installed.is_ok()
        && let Some(e) = bad
    {
        tracing::warn!(filter, error = %e, fallback, "invalid log filter; using the fallback");
    }
}

/// Reports the error a binary exits with: as before (`Error: …` with its causes) in text, as
/// one JSON log line in JSON, so a log pipeline never gets a line it cannot parse.
pub fn fatal<E: std::fmt::Display + std::fmt::Debug>(format: LogFormat, error: &E) {
    match format {
        LogFormat::Text => eprintln!("Error: {error:?}"),
        // `{:#}`: the error and its causes on one line (anyhow's alternate form).
        LogFormat::Json => tracing::error!(error = %format!("{error:#}"), "exiting on an error"),
    }
}

/// An error and its sources, each once: `outer: inner: cause`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let m = s.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        src = s.source();
    }
    out
}
