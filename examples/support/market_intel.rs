//! A market-intelligence workflow over a folder of documents, shared by the examples.
//!
//! A production executor would crawl regulators, journals and trial registries. This one
//! reads Markdown and text files from a local folder instead, so that the examples run
//! offline and give the same answer every time, but it goes through the same stages and
//! reports progress the same way:
//!
//! | stage | progress | what it does |
//! |---|---|---|
//! | discovery | 10 -> 30 % | keeps documents of a wanted source and quality naming a keyword |
//! | extraction | 40 -> 70 % | keeps the sentences the extraction mode asks for |
//! | aggregation | 75 -> 85 % | counts mentions per keyword and per source, with date ranges |
//! | report | 90 -> 100 % | writes `<reports_dir>/<request_id>.md` |
//!
//! # Corpus format
//!
//! Each `.md` or `.txt` file may start with a header of `key: value` lines, ended by a
//! blank line, before its body:
//!
//! ```text
//! title: Wegovy approved for chronic weight management
//! source: FDA
//! type: regulatory
//! date: 2021-06-04
//! quality: 1.0
//!
//! On 4 June 2021 the FDA approved ...
//! ```
//!
//! `date` is `YYYY-MM-DD` or `YYYY-MM`; `quality` (0.0 to 1.0) defaults to 1.0. A file whose
//! first line is not one of these keys has no header: its source is its file stem, its type
//! `web`, and it is undated. A file that cannot be read or has a malformed header is
//! skipped with a warning and listed in the report; it does not fail the request.
//!
//! # Parameters
//!
//! `configuration.custom_params.stage_delay_ms` (a whole number, default 0) makes every
//! stage wait that long, so that progress can be watched; a cancel interrupts the wait.
//!
//! The module depends on nothing but the executor API, so examples on any store or
//! strategy can register it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use chrono::NaiveDate;
use root_orchestrator::{
    Configuration, ExtractionMode, Progress, Request, RequestResults, Source, WorkflowContext,
    WorkflowError, WorkflowExecutor,
};
use serde_json::json;

/// Header keys; a first line starting with one of them marks a file as having a header.
const HEADER_KEYS: [&str; 5] = ["title", "source", "type", "date", "quality"];

/// Runs market-intelligence requests against a local corpus and writes a Markdown report
/// per request.
#[derive(Debug, Clone)]
pub struct MarketIntelligenceWorkflow {
    corpus_dir: PathBuf,
    reports_dir: PathBuf,
}

impl MarketIntelligenceWorkflow {
    /// A workflow reading the documents of `corpus_dir` (not its subfolders) and writing
    /// reports into `reports_dir`, which is created when missing.
    pub fn new(corpus_dir: impl Into<PathBuf>, reports_dir: impl Into<PathBuf>) -> Self {
        MarketIntelligenceWorkflow {
            corpus_dir: corpus_dir.into(),
            reports_dir: reports_dir.into(),
        }
    }
}

#[async_trait]
impl WorkflowExecutor for MarketIntelligenceWorkflow {
    async fn execute(
        &self,
        request: &Request,
        ctx: &WorkflowContext,
    ) -> Result<RequestResults, WorkflowError> {
        let configuration = &request.configuration;
        // Checked before any work: a bad parameter fails the request at once, and
        // permanently, since every retry would meet it again.
        let delay = stage_delay(configuration)?;
        let keywords = Keywords::new(&configuration.keywords);

        // Discovery.
        ctx.report_progress(progress("discovery", 10, 0, 0)).await?;
        let corpus_dir = self.corpus_dir.clone();
        let corpus = blocking(move || load_corpus(&corpus_dir)).await?;
        pace(ctx, delay).await?;
        let matched: Vec<&Document> = corpus
            .documents
            .iter()
            .filter(|doc| doc.is_wanted(configuration, &keywords))
            .collect();
        let found = matched.len() as u64;
        ctx.report_progress(progress("discovery", 30, found, 0))
            .await?;

        // Extraction.
        ctx.report_progress(progress("extraction", 40, found, 0))
            .await?;
        pace(ctx, delay).await?;
        let passages: Vec<Passage<'_>> = matched
            .iter()
            .flat_map(|doc| extract(doc, configuration.extraction_mode, &keywords))
            .collect();
        let sentences = passages.iter().map(|p| p.sentences as u64).sum();
        ctx.report_progress(progress("extraction", 70, found, sentences))
            .await?;

        // Aggregation.
        ctx.report_progress(progress("aggregation", 75, found, sentences))
            .await?;
        pace(ctx, delay).await?;
        let stats = Aggregates::of(&matched, &keywords);
        ctx.report_progress(progress("aggregation", 85, found, sentences))
            .await?;

        // Report.
        ctx.report_progress(progress("report", 90, found, sentences))
            .await?;
        pace(ctx, delay).await?;
        let report = render_report(request, &corpus, &matched, &passages, &stats)
            .map_err(|e| WorkflowError::permanent("could not render the report").with_source(e))?;
        let path = self.reports_dir.join(report_file_name(request));
        let reports_dir = self.reports_dir.clone();
        let target = path.clone();
        blocking(move || write_report(&reports_dir, &target, &report)).await?;
        ctx.report_progress(progress("report", 100, found, sentences))
            .await?;

        let summary = json!({
            "documents_read": corpus.documents.len(),
            "documents_skipped": corpus.skipped.len(),
            "documents_matched": found,
            "sentences_extracted": sentences,
            "extraction_mode": mode_name(configuration.extraction_mode),
            "keyword_mentions": stats
                .keywords
                .iter()
                .map(|k| (k.keyword.clone(), json!(k.mentions)))
                .collect::<serde_json::Map<_, _>>(),
            "source_documents": stats
                .sources
                .iter()
                .map(|(name, s)| (name.clone(), json!(s.documents)))
                .collect::<serde_json::Map<_, _>>(),
        });
        Ok(RequestResults::new(
            Some(path.display().to_string()),
            summary,
        ))
    }
}

/// Progress at `stage`, with the documents matched and sentences extracted so far.
fn progress(stage: &str, percentage: u8, documents: u64, sentences: u64) -> Progress {
    Progress::at_stage(stage, percentage)
        .with_urls_found(documents)
        .with_content_extracted(sentences)
}

/// Longest per-stage wait a request may ask for: the wait only paces demos, and one
/// request must not be able to hold a worker for days.
const MAX_STAGE_DELAY_MS: u64 = 60_000;

/// The per-stage wait asked for in `custom_params.stage_delay_ms`.
fn stage_delay(configuration: &Configuration) -> Result<Duration, WorkflowError> {
    match configuration.custom_params.get("stage_delay_ms") {
        None | Some(serde_json::Value::Null) => Ok(Duration::ZERO),
        Some(value) => value
            .as_u64()
            .filter(|ms| *ms <= MAX_STAGE_DELAY_MS)
            .map(Duration::from_millis)
            .ok_or_else(|| {
                WorkflowError::permanent(format!(
                    "configuration.custom_params.stage_delay_ms must be a whole number of \
                     milliseconds from 0 to {MAX_STAGE_DELAY_MS}, got {value}"
                ))
            }),
    }
}

/// Waits `delay` between stages, returning early (as cancelled) when the attempt must stop.
async fn pace(ctx: &WorkflowContext, delay: Duration) -> Result<(), WorkflowError> {
    if ctx.is_cancelled() {
        return Err(WorkflowError::cancelled());
    }
    if delay.is_zero() {
        return Ok(());
    }
    tokio::select! {
        () = ctx.cancelled() => Err(WorkflowError::cancelled()),
        () = tokio::time::sleep(delay) => Ok(()),
    }
}

/// Runs file-system work off the async workers, which it would otherwise stall.
async fn blocking<T, F>(work: F) -> Result<T, WorkflowError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, WorkflowError> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| WorkflowError::retryable("file-system task did not finish").with_source(e))?
}

/// A file-system failure: retryable unless retrying obviously cannot help.
fn io_failure(what: String, err: io::Error) -> WorkflowError {
    let hopeless = matches!(
        err.kind(),
        io::ErrorKind::NotFound
            | io::ErrorKind::PermissionDenied
            | io::ErrorKind::NotADirectory
            | io::ErrorKind::IsADirectory
            | io::ErrorKind::ReadOnlyFilesystem
            | io::ErrorKind::InvalidInput
    );
    let error = if hopeless {
        WorkflowError::permanent(what)
    } else {
        WorkflowError::retryable(what)
    };
    error.with_source(err)
}

/// The request's keywords with their lowercase forms, for case-insensitive matching.
struct Keywords {
    terms: Vec<(String, String)>,
}

impl Keywords {
    fn new(keywords: &[String]) -> Self {
        Keywords {
            terms: keywords
                .iter()
                .map(|k| (k.clone(), k.trim().to_lowercase()))
                .collect(),
        }
    }

    /// Whether `lowercase_text` mentions any keyword.
    fn any_in(&self, lowercase_text: &str) -> bool {
        self.terms
            .iter()
            .any(|(_, k)| lowercase_text.contains(k.as_str()))
    }
}

/// One document of the corpus.
struct Document {
    title: String,
    source: String,
    doc_type: String,
    /// Normalised `YYYY-MM-DD` or `YYYY-MM`, so that text order is date order.
    date: Option<String>,
    quality: f64,
    body: String,
    /// `body` in lowercase, for matching.
    lowercase_body: String,
}

impl Document {
    fn is_wanted(&self, configuration: &Configuration, keywords: &Keywords) -> bool {
        self.comes_from(&configuration.sources)
            && self.quality >= configuration.quality_threshold
            && keywords.any_in(&self.lowercase_body)
    }

    /// Whether the document is of a requested source type or by a requested source name.
    fn comes_from(&self, sources: &[Source]) -> bool {
        sources.iter().any(|source| {
            same_text(&self.doc_type, &source.source_type) || same_text(&self.source, &source.name)
        })
    }

    fn mentions_of(&self, lowercase_keyword: &str) -> u64 {
        if lowercase_keyword.is_empty() {
            return 0;
        }
        self.lowercase_body.matches(lowercase_keyword).count() as u64
    }
}

fn same_text(a: &str, b: &str) -> bool {
    a.trim().to_lowercase() == b.trim().to_lowercase()
}

/// The documents read, and the files left out with the reason.
struct Corpus {
    documents: Vec<Document>,
    skipped: Vec<(String, String)>,
}

fn load_corpus(dir: &Path) -> Result<Corpus, WorkflowError> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        io_failure(
            format!("cannot read the corpus folder {}", dir.display()),
            e,
        )
    })?;

    let mut files = Vec::new();
    let mut skipped = Vec::new();
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(err) => {
                skipped.push((
                    dir.display().to_string(),
                    format!("unreadable entry: {err}"),
                ));
                continue;
            }
        };
        let path = entry.path();
        let is_document = path
            .extension()
            .and_then(|ext| ext.to_str())
            .is_some_and(|ext| ext.eq_ignore_ascii_case("md") || ext.eq_ignore_ascii_case("txt"));
        if is_document && path.is_file() {
            files.push(path);
        }
    }
    // Directory order differs between file systems; sorting keeps reports reproducible.
    files.sort();

    let mut documents = Vec::new();
    for path in files {
        let file = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stem = path
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_else(|| file.clone());
        let parsed = std::fs::read_to_string(&path)
            .map_err(|err| format!("cannot read it: {err}"))
            .and_then(|text| parse_document(&stem, &text));
        match parsed {
            Ok(document) => documents.push(document),
            Err(reason) => {
                tracing::warn!(file = %path.display(), %reason, "skipping corpus file");
                skipped.push((file, reason));
            }
        }
    }
    Ok(Corpus { documents, skipped })
}

/// Parses a file's optional header and its body; `Err` says what is wrong with the header.
fn parse_document(stem: &str, text: &str) -> Result<Document, String> {
    // Editors on some systems save a byte-order mark, which would hide the first key.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut document = Document {
        title: stem.to_owned(),
        source: stem.to_owned(),
        doc_type: "web".to_owned(),
        date: None,
        quality: 1.0,
        body: String::new(),
        lowercase_body: String::new(),
    };

    let has_header = text
        .lines()
        .next()
        .and_then(|line| line.split_once(':'))
        .is_some_and(|(key, _)| HEADER_KEYS.contains(&key.trim().to_lowercase().as_str()));
    let body = if has_header {
        let mut lines = text.lines().enumerate();
        for (index, line) in lines.by_ref() {
            if line.trim().is_empty() {
                break;
            }
            apply_header_line(&mut document, index + 1, line)?;
        }
        lines.map(|(_, line)| line).collect::<Vec<_>>().join("\n")
    } else {
        text.to_owned()
    };

    document.lowercase_body = body.to_lowercase();
    document.body = body;
    Ok(document)
}

fn apply_header_line(
    document: &mut Document,
    line_number: usize,
    line: &str,
) -> Result<(), String> {
    let Some((key, value)) = line.split_once(':') else {
        return Err(format!("header line {line_number} is not `key: value`"));
    };
    let key = key.trim().to_lowercase();
    let value = value.trim();
    if value.is_empty() {
        return Err(format!("header line {line_number}: `{key}` has no value"));
    }
    match key.as_str() {
        "title" => document.title = value.to_owned(),
        "source" => document.source = value.to_owned(),
        "type" => document.doc_type = value.to_owned(),
        "date" => document.date = Some(parse_date(value)?),
        "quality" => document.quality = parse_quality(value)?,
        // Unknown keys are kept out of the way rather than refused, so that a corpus
        // with extra metadata (authors, links) still loads.
        _ => {}
    }
    Ok(())
}

/// `YYYY-MM-DD` or `YYYY-MM`, returned zero-padded so that dates sort as text.
fn parse_date(value: &str) -> Result<String, String> {
    if let Ok(day) = NaiveDate::parse_from_str(value, "%Y-%m-%d") {
        return Ok(day.format("%Y-%m-%d").to_string());
    }
    if let Ok(month) = NaiveDate::parse_from_str(&format!("{value}-01"), "%Y-%m-%d") {
        return Ok(month.format("%Y-%m").to_string());
    }
    Err(format!("date {value:?} is neither YYYY-MM-DD nor YYYY-MM"))
}

fn parse_quality(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(quality) if (0.0..=1.0).contains(&quality) => Ok(quality),
        _ => Err(format!("quality {value:?} is not a number from 0.0 to 1.0")),
    }
}

/// Consecutive extracted sentences of one document.
struct Passage<'a> {
    document: &'a Document,
    text: String,
    sentences: usize,
}

/// The sentences of `document` that `mode` keeps, as passages of consecutive sentences.
fn extract<'a>(
    document: &'a Document,
    mode: ExtractionMode,
    keywords: &Keywords,
) -> Vec<Passage<'a>> {
    let sentences = split_sentences(&document.body);
    let matching = sentences
        .iter()
        .enumerate()
        .filter(|(_, sentence)| keywords.any_in(&sentence.to_lowercase()))
        .map(|(index, _)| index);

    let kept: BTreeSet<usize> = match mode {
        ExtractionMode::Standard => matching.collect(),
        ExtractionMode::Comprehensive => matching
            .flat_map(|index| [index, index + 1])
            .filter(|&index| index < sentences.len())
            .collect(),
        ExtractionMode::Summary => matching.take(1).collect(),
    };

    let mut passages: Vec<Passage<'a>> = Vec::new();
    let mut previous: Option<usize> = None;
    for index in kept {
        let sentence = &sentences[index];
        match passages.last_mut() {
            Some(passage) if previous.is_some_and(|p| p + 1 == index) => {
                passage.text.push(' ');
                passage.text.push_str(sentence);
                passage.sentences += 1;
            }
            _ => passages.push(Passage {
                document,
                text: sentence.clone(),
                sentences: 1,
            }),
        }
        previous = Some(index);
    }
    passages
}

/// Splits text into sentences: paragraphs end at blank lines, sentences at `.`, `!` or `?`
/// followed by white space (so `2.4 mg` stays whole).
fn split_sentences(text: &str) -> Vec<String> {
    let mut paragraphs = Vec::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() {
            if !current.is_empty() {
                paragraphs.push(std::mem::take(&mut current));
            }
        } else {
            if !current.is_empty() {
                current.push(' ');
            }
            current.push_str(line);
        }
    }
    if !current.is_empty() {
        paragraphs.push(current);
    }

    let mut sentences = Vec::new();
    for paragraph in &paragraphs {
        let mut start = 0;
        let mut chars = paragraph.char_indices().peekable();
        while let Some((index, c)) = chars.next() {
            let ends_sentence = matches!(c, '.' | '!' | '?')
                && chars.peek().is_none_or(|(_, next)| next.is_whitespace());
            if ends_sentence {
                let end = index + c.len_utf8();
                push_trimmed(&mut sentences, &paragraph[start..end]);
                start = end;
            }
        }
        push_trimmed(&mut sentences, &paragraph[start..]);
    }
    sentences
}

fn push_trimmed(sentences: &mut Vec<String>, sentence: &str) {
    let sentence = sentence.trim();
    if !sentence.is_empty() {
        sentences.push(sentence.to_owned());
    }
}

/// Mentions, documents and date range of one keyword across the matched documents.
struct KeywordStats {
    keyword: String,
    mentions: u64,
    documents: u64,
    earliest: Option<String>,
    latest: Option<String>,
}

/// Documents and keyword mentions of one source.
#[derive(Default)]
struct SourceStats {
    documents: u64,
    mentions: u64,
}

struct Aggregates {
    keywords: Vec<KeywordStats>,
    sources: BTreeMap<String, SourceStats>,
}

impl Aggregates {
    fn of(documents: &[&Document], keywords: &Keywords) -> Self {
        let keyword_stats = keywords
            .terms
            .iter()
            .map(|(keyword, lowercase)| {
                let mut stats = KeywordStats {
                    keyword: keyword.clone(),
                    mentions: 0,
                    documents: 0,
                    earliest: None,
                    latest: None,
                };
                for document in documents {
                    let mentions = document.mentions_of(lowercase);
                    if mentions == 0 {
                        continue;
                    }
                    stats.mentions += mentions;
                    stats.documents += 1;
                    if let Some(date) = &document.date {
                        if stats.earliest.as_ref().is_none_or(|e| date < e) {
                            stats.earliest = Some(date.clone());
                        }
                        if stats.latest.as_ref().is_none_or(|l| date > l) {
                            stats.latest = Some(date.clone());
                        }
                    }
                }
                stats
            })
            .collect();

        let mut sources: BTreeMap<String, SourceStats> = BTreeMap::new();
        for document in documents {
            let stats = sources.entry(document.source.clone()).or_default();
            stats.documents += 1;
            stats.mentions += keywords
                .terms
                .iter()
                .map(|(_, lowercase)| document.mentions_of(lowercase))
                .sum::<u64>();
        }

        Aggregates {
            keywords: keyword_stats,
            sources,
        }
    }
}

fn mode_name(mode: ExtractionMode) -> &'static str {
    match mode {
        ExtractionMode::Standard => "standard",
        ExtractionMode::Comprehensive => "comprehensive",
        ExtractionMode::Summary => "summary",
    }
}

/// `<request id>.md`; ids may hold `:`, which some file systems refuse in names.
fn report_file_name(request: &Request) -> String {
    format!("{}.md", request.id.as_str().replace(':', "_"))
}

/// Text for a Markdown table cell: a `|` would end the cell, a line break the row.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace(['\r', '\n'], " ")
}

fn render_report(
    request: &Request,
    corpus: &Corpus,
    matched: &[&Document],
    passages: &[Passage<'_>],
    stats: &Aggregates,
) -> Result<String, std::fmt::Error> {
    let configuration = &request.configuration;
    let mut out = String::new();

    writeln!(out, "# Market intelligence report")?;
    writeln!(out)?;
    writeln!(
        out,
        "- Request: `{}` ({})",
        request.id, request.request_type
    )?;
    writeln!(
        out,
        "- Project: {}, submitted by {}, priority {}",
        request.project_id, request.user_id, request.priority
    )?;
    let keywords: Vec<String> = configuration
        .keywords
        .iter()
        .map(|k| format!("`{k}`"))
        .collect();
    writeln!(out, "- Keywords: {}", keywords.join(", "))?;
    let sources: Vec<String> = configuration
        .sources
        .iter()
        .map(|s| format!("{} ({})", s.name, s.source_type))
        .collect();
    writeln!(out, "- Sources: {}", sources.join(", "))?;
    writeln!(
        out,
        "- Extraction mode: {}; quality threshold {}",
        mode_name(configuration.extraction_mode),
        configuration.quality_threshold
    )?;
    writeln!(
        out,
        "- Corpus: {} documents read, {} matched, {} skipped",
        corpus.documents.len(),
        matched.len(),
        corpus.skipped.len()
    )?;
    writeln!(out)?;

    writeln!(out, "## Keywords")?;
    writeln!(out)?;
    writeln!(
        out,
        "| keyword | mentions | documents | earliest | latest |"
    )?;
    writeln!(out, "|---|---:|---:|---|---|")?;
    for k in &stats.keywords {
        writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            cell(&k.keyword),
            k.mentions,
            k.documents,
            k.earliest.as_deref().unwrap_or("-"),
            k.latest.as_deref().unwrap_or("-")
        )?;
    }
    writeln!(out)?;

    writeln!(out, "## Sources")?;
    writeln!(out)?;
    writeln!(out, "| source | documents | mentions |")?;
    writeln!(out, "|---|---:|---:|")?;
    for (name, s) in &stats.sources {
        writeln!(out, "| {} | {} | {} |", cell(name), s.documents, s.mentions)?;
    }
    writeln!(out)?;

    writeln!(out, "## Timeline")?;
    writeln!(out)?;
    if passages.is_empty() {
        writeln!(out, "No matching sentences.")?;
    }
    let mut timeline: Vec<&Passage<'_>> = passages.iter().collect();
    // Undated passages go last; ties keep file order, which the corpus loader sorted.
    timeline.sort_by_key(|p| (p.document.date.is_none(), p.document.date.clone()));
    for passage in timeline {
        let doc = passage.document;
        writeln!(
            out,
            "- **{}** · {} · *{}*: {}",
            doc.date.as_deref().unwrap_or("undated"),
            doc.source,
            doc.title,
            passage.text
        )?;
    }

    if !corpus.skipped.is_empty() {
        writeln!(out)?;
        writeln!(out, "## Skipped files")?;
        writeln!(out)?;
        for (file, reason) in &corpus.skipped {
            writeln!(out, "- `{file}`: {reason}")?;
        }
    }
    Ok(out)
}

/// Writes the report through a temporary file and a rename, so that a worker killed
/// mid-write never leaves a truncated report where a finished one is expected.
fn write_report(dir: &Path, path: &Path, report: &str) -> Result<(), WorkflowError> {
    std::fs::create_dir_all(dir).map_err(|e| {
        io_failure(
            format!("cannot create the reports folder {}", dir.display()),
            e,
        )
    })?;
    let partial = path.with_extension("md.partial");
    std::fs::write(&partial, report)
        .map_err(|e| io_failure(format!("cannot write {}", partial.display()), e))?;
    std::fs::rename(&partial, path)
        .map_err(|e| io_failure(format!("cannot move the report to {}", path.display()), e))
}
