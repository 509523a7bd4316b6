//! Lua runs on threads of its own, never on the async workers: one thread per state, taking
//! calls from a bounded queue. A call waits at most `policy.queue_timeout` for a state and
//! runs under its state's meter (`policy.instruction_limit`, `policy.call_timeout`); the
//! caller never waits longer than that, whatever a script does. A state whose call ran out is
//! rebuilt. The verdict chain, `on_error`, and the counters an operator watches live here.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use mlua::{MultiValue, Table, Value};
use tokio::sync::oneshot;

use super::sandbox::{Exhausted, Hook, Script, Sources, State, HOOKS};
use super::settings::Settings as PolicySettings;
use super::{
    AuthDecision, AuthView, ClientView, Decision, MessageView, Policy, PolicyError, PublishView,
    PushView, SubscribeView,
};
use crate::hook::OnError;

/// Longest deny reason a client gets (also the MQTT reason string it travels in).
pub const MAX_REASON: usize = 256;
/// Calls waiting for a state beyond the running ones; more are refused at once.
const QUEUE: usize = 1024;
/// How long failures of one script and kind are logged once, counted in between.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Verdict counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyStats {
    /// Calls that allowed.
    pub allowed: u64,
    /// Calls that denied (scripts' verdicts, not errors).
    pub denied: u64,
    /// Messages whose text a script rewrote.
    pub rewritten: u64,
    /// Script errors, limit hits, time-outs and bad return values (each then followed
    /// `on_error`).
    pub errors: u64,
    /// Successful reloads.
    pub reloads: u64,
    /// Reloads refused because the new scripts did not load.
    pub failed_reloads: u64,
}

#[derive(Debug, Default)]
struct Counters {
    allowed: AtomicU64,
    denied: AtomicU64,
    rewritten: AtomicU64,
    reloads: AtomicU64,
    failed_reloads: AtomicU64,
}

/// What went wrong with a script, as the `kind` label of `mqtt_im_policy_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FailureKind {
    /// The script did not load (syntax, top-level error, bad `hooks`).
    Load,
    /// A runtime error.
    Runtime,
    /// The instruction budget ran out.
    Budget,
    /// The CPU-time deadline passed, or no answer came within the caller's wall-clock wait.
    Deadline,
    /// A return value that is no verdict.
    BadReturn,
    /// No state was free in time.
    Busy,
}

impl FailureKind {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            FailureKind::Load => "load",
            FailureKind::Runtime => "runtime",
            FailureKind::Budget => "budget",
            FailureKind::Deadline => "deadline",
            FailureKind::BadReturn => "bad_return",
            FailureKind::Busy => "busy",
        }
    }
}

/// One failure of one script.
#[derive(Debug)]
struct Failure {
    script: String,
    kind: FailureKind,
    error: String,
}

/// Failures of one script and kind: in all, when last logged, and since then.
#[derive(Debug, Default)]
struct Tally {
    total: u64,
    logged: Option<Instant>,
    quiet: u64,
}

/// Failures counted per script and kind, logged once per burst.
#[derive(Debug, Default)]
struct Failures {
    counts: Mutex<BTreeMap<(String, FailureKind), Tally>>,
}

impl Failures {
    fn record(&self, hook: Hook, failure: &Failure) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (failure.script.clone(), failure.kind);
        let tally = counts.entry(key).or_default();
        tally.total += 1;
        if tally.logged.is_some_and(|at| at.elapsed() < LOG_EVERY) {
            tally.quiet += 1;
            return;
        }
        tracing::warn!(
            script = %failure.script,
            hook = hook.name(),
            kind = failure.kind.label(),
            error = %crate::text::clean(&failure.error, 512),
            also_since_last = tally.quiet,
            "policy script failed"
        );
        tally.logged = Some(Instant::now());
        tally.quiet = 0;
    }

    fn totals(&self) -> Vec<(String, FailureKind, u64)> {
        let counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        counts
            .iter()
            .map(|((script, kind), tally)| (script.clone(), *kind, tally.total))
            .collect()
    }
}

/// What a hook is called with.
#[derive(Debug)]
enum Input {
    Message(MessageView),
    Connect(ClientView),
    Subscribe(SubscribeView),
    Publish(PublishView),
    Auth(AuthView),
    Push(PushView),
}

impl Input {
    fn hook(&self) -> Hook {
        match self {
            Input::Message(_) => Hook::Message,
            Input::Connect(_) => Hook::Connect,
            Input::Subscribe(_) => Hook::Subscribe,
            Input::Publish(_) => Hook::Publish,
            Input::Auth(_) => Hook::Auth,
            Input::Push(_) => Hook::Push,
        }
    }
}

/// How a chain ended, and what failed on the way.
#[derive(Debug)]
struct Outcome {
    decision: Decision,
    failures: Vec<Failure>,
    /// No script decided (each passed, or none serves the hook): `on_auth` asks the next
    /// provider then.
    passed: bool,
}

impl Outcome {
    /// Whether a script of the chain ran out of its budget or deadline.
    fn ran_out(&self) -> bool {
        self.failures
            .iter()
            .any(|f| matches!(f.kind, FailureKind::Budget | FailureKind::Deadline))
    }
}

struct Job {
    input: Input,
    queued: Instant,
    reply: oneshot::Sender<Outcome>,
}

/// One set of loaded scripts and the threads running them; replaced whole on reload. Dropping
/// it closes the queue: each thread finishes and drops its state on its own thread.
#[derive(Debug)]
struct Workers {
    jobs: mpsc::SyncSender<Job>,
    /// Scripts in the chain: a call takes at most this many deadlines.
    scripts: u64,
    /// Whether any script implements (or, failed to load under `deny`, refuses) each hook:
    /// a hook nobody serves never waits for Lua.
    serves: [bool; HOOKS],
}

/// The Lua policy: scripts from `policy.scripts`, run on threads of their own.
#[derive(Debug)]
pub struct LuaPolicy {
    settings: Arc<PolicySettings>,
    workers: RwLock<Arc<Workers>>,
    counters: Counters,
    failures: Arc<Failures>,
}

impl LuaPolicy {
    /// Loads every script into `policy.states` states, each on its own thread. A script that
    /// fails to load is kept as broken (it follows `on_error`); unreadable files are an error.
    ///
    /// # Errors
    /// A script or word list cannot be read, or a Lua state or thread cannot be created.
    pub fn load(settings: PolicySettings) -> Result<Self, PolicyError> {
        let settings = Arc::new(settings);
        let failures = Arc::new(Failures::default());
        let workers = start(&settings, false, &failures)?;
        Ok(Self {
            settings,
            workers: RwLock::new(Arc::new(workers)),
            counters: Counters::default(),
            failures,
        })
    }

    /// Loads every script once, as start-up would, and reports the first that fails.
    ///
    /// # Errors
    /// A file cannot be read, or a script does not load (with its name, line and reason).
    pub fn check(settings: &PolicySettings) -> Result<(), PolicyError> {
        let sources = Sources::read(settings)?;
        State::new(settings, &sources, true).map(drop)
    }

    /// Reads and loads the scripts again (bounded by the same limits); new calls use them only
    /// if every script loaded.
    ///
    /// # Errors
    /// The new version failed to load; the old one stays in use.
    pub fn reload(&self) -> Result<(), PolicyError> {
        match start(&self.settings, true, &self.failures) {
            Ok(workers) => {
                let old = {
                    let mut current = self.workers.write().unwrap_or_else(PoisonError::into_inner);
                    std::mem::replace(&mut *current, Arc::new(workers))
                };
                // Outside the lock: the old threads finish their calls and drop their states.
                drop(old);
                self.counters.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!("policy scripts reloaded");
                Ok(())
            }
            Err(e) => {
                self.counters.failed_reloads.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "policy reload failed; keeping the previous scripts");
                Err(e)
            }
        }
    }

    /// The settings the policy was loaded with (files to watch for reload).
    pub(crate) fn settings(&self) -> &PolicySettings {
        &self.settings
    }

    /// Verdict counters since start.
    pub fn stats(&self) -> PolicyStats {
        let c = &self.counters;
        PolicyStats {
            allowed: c.allowed.load(Ordering::Relaxed),
            denied: c.denied.load(Ordering::Relaxed),
            rewritten: c.rewritten.load(Ordering::Relaxed),
            errors: self.failures.totals().iter().map(|(_, _, n)| n).sum(),
            reloads: c.reloads.load(Ordering::Relaxed),
            failed_reloads: c.failed_reloads.load(Ordering::Relaxed),
        }
    }

    /// Failures since start by script file name and kind.
    pub fn failures(&self) -> Vec<(String, FailureKind, u64)> {
        self.failures.totals()
    }

    async fn run(&self, input: Input) -> Decision {
        self.run_outcome(input).await.decision
    }

    async fn run_outcome(&self, input: Input) -> Outcome {
        let hook = input.hook();
        let workers = Arc::clone(&self.workers.read().unwrap_or_else(PoisonError::into_inner));
        if !workers.serves[hook.index()] {
            return Outcome {
                decision: Decision::Allow(None),
                failures: Vec::new(),
                passed: true,
            };
        }
        let (reply, answer) = oneshot::channel();
        let job = Job {
            input,
            queued: Instant::now(),
            reply,
        };
        let settings = &self.settings;
        let scripts = u32::try_from(workers.scripts.max(1)).unwrap_or(u32::MAX);
        let waited = settings.queue_timeout.0 + settings.call_timeout.0.saturating_mul(scripts);
        let outcome = match workers.jobs.try_send(job) {
            Ok(()) => match tokio::time::timeout(waited + GRACE, answer).await {
                Ok(Ok(outcome)) => outcome,
                _ => self.whole_call_failed(FailureKind::Deadline, "no answer in time"),
            },
            Err(_) => self.whole_call_failed(FailureKind::Busy, "every Lua state is busy"),
        };
        for failure in &outcome.failures {
            self.failures.record(hook, failure);
        }
        match &outcome.decision {
            Decision::Allow(text) => {
                self.counters.allowed.fetch_add(1, Ordering::Relaxed);
                if text.is_some() {
                    self.counters.rewritten.fetch_add(1, Ordering::Relaxed);
                }
            }
            Decision::Deny(_) => {
                self.counters.denied.fetch_add(1, Ordering::Relaxed);
            }
        }
        outcome
    }

    fn whole_call_failed(&self, kind: FailureKind, error: &str) -> Outcome {
        unanswered(self.settings.on_error, kind, error.to_owned())
    }
}

/// A call that got no answer from any script: `on_error` decides.
fn unanswered(mode: OnError, kind: FailureKind, error: String) -> Outcome {
    Outcome {
        decision: on_error(mode, "the policy"),
        failures: vec![Failure {
            script: "-".into(),
            kind,
            error,
        }],
        passed: false,
    }
}

/// How long an idle Lua thread keeps polling the queue before it sleeps.
const HOT_POLL: Duration = Duration::from_micros(50);

/// Time a caller allows on top of the limits for a thread to hand its answer over.
const GRACE: Duration = Duration::from_millis(20);

fn on_error(on_error: OnError, script: &str) -> Decision {
    match on_error {
        OnError::Allow => Decision::Allow(None),
        OnError::Deny => Decision::Deny(format!("policy error in {script}")),
    }
}

/// Loads the scripts into `policy.states` states and starts a thread for each.
fn start(
    settings: &Arc<PolicySettings>,
    strict: bool,
    failures: &Arc<Failures>,
) -> Result<Workers, PolicyError> {
    let sources = Arc::new(Sources::read(settings)?);
    let mut states = Vec::with_capacity(settings.states);
    for _ in 0..settings.states {
        states.push(State::new(settings, &sources, strict)?);
    }
    let serves = Hook::ALL.map(|hook| {
        states.first().is_some_and(|state| {
            state.scripts.iter().any(|script| match script {
                Script::Broken { .. } => settings.on_error == OnError::Deny,
                loaded => loaded.hook(hook).is_some(),
            })
        })
    });
    if let Some(state) = states.first() {
        for script in &state.scripts {
            if let Script::Broken { name, error } = script {
                let failure = Failure {
                    script: name.clone(),
                    kind: FailureKind::Load,
                    error: error.clone(),
                };
                failures.record(Hook::Message, &failure);
            }
        }
    }
    let (jobs, queue) = mpsc::sync_channel(QUEUE);
    let queue = Arc::new(Mutex::new(queue));
    for (index, state) in states.into_iter().enumerate() {
        let worker = Worker {
            state,
            queue: Arc::clone(&queue),
            settings: Arc::clone(settings),
            sources: Arc::clone(&sources),
        };
        std::thread::Builder::new()
            .name(format!("mqtt-im-lua-{index}"))
            .spawn(move || worker.run())
            .map_err(|e| PolicyError::Lua(format!("cannot start a Lua thread: {e}")))?;
    }
    let scripts = u64::try_from(sources.scripts.len()).unwrap_or(u64::MAX);
    Ok(Workers {
        jobs,
        scripts,
        serves,
    })
}

/// One Lua thread and the state it owns.
struct Worker {
    state: State,
    queue: Arc<Mutex<mpsc::Receiver<Job>>>,
    settings: Arc<PolicySettings>,
    sources: Arc<Sources>,
}

impl Worker {
    fn run(mut self) {
        loop {
            let Some(job) = self.next_job() else {
                return;
            };
            let waited = job.queued.elapsed();
            let outcome = if waited > self.settings.queue_timeout.0 {
                let error = format!("waited {} ms for a Lua state", waited.as_millis());
                unanswered(self.settings.on_error, FailureKind::Busy, error)
            } else {
                let outcome = chain(&self.state, &self.settings, &job.input);
                if outcome.ran_out() {
                    self.rebuild();
                }
                outcome
            };
            let _ = job.reply.send(outcome);
        }
    }

    /// The next call: a busy queue is polled for a moment before the thread sleeps, so under
    /// load calls do not each pay for waking it.
    fn next_job(&self) -> Option<Job> {
        let queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let polling = Instant::now();
        while polling.elapsed() < HOT_POLL {
            match queue.try_recv() {
                Ok(job) => return Some(job),
                Err(mpsc::TryRecvError::Empty) => std::thread::yield_now(),
                Err(mpsc::TryRecvError::Disconnected) => return None,
            }
        }
        queue.recv().ok()
    }

    /// A state whose call ran out may hold half-done work of the script: start afresh.
    fn rebuild(&mut self) {
        match State::new(&self.settings, &self.sources, false) {
            Ok(state) => self.state = state,
            Err(e) => tracing::error!(error = %e, "cannot rebuild a Lua state; keeping it"),
        }
    }
}

/// Runs the scripts in order until one allows or denies; rewrites carry on. A failing script
/// denies under `on_error = "deny"`, and is skipped under `"allow"` (earlier rewrites kept).
fn chain(state: &State, settings: &PolicySettings, input: &Input) -> Outcome {
    let hook = input.hook();
    // Built once per chain (under a fresh meter: the last call's deadline may be long past);
    // each script gets a copy.
    state.meter.start();
    let argument = match fields(state, input) {
        Ok(argument) => argument,
        Err(e) => {
            return unanswered(settings.on_error, failure_kind(state, &e), e.to_string());
        }
    };
    // The latest rewrite (also set in `argument`, so later scripts see it).
    let mut rewritten: Option<String> = None;
    let mut failures = Vec::new();
    for script in &state.scripts {
        // Each script has the whole budget and deadline of a call.
        state.meter.start();
        let name = script.name();
        let verdict = match script {
            Script::Broken { error, .. } => {
                Err((FailureKind::Load, format!("did not load: {error}")))
            }
            Script::Loaded { .. } => match script.hook(hook) {
                None => continue,
                Some(function) => state
                    .call_with_copy
                    .call::<MultiValue>((function, &argument))
                    .map_err(|e| (failure_kind(state, &e), e.to_string())),
            },
        };
        let values = match verdict {
            Ok(values) => values,
            Err((kind, error)) => {
                failures.push(Failure {
                    script: name.to_owned(),
                    kind,
                    error,
                });
                match settings.on_error {
                    OnError::Deny => return deny(on_error(OnError::Deny, name), failures),
                    OnError::Allow => continue,
                }
            }
        };
        let mut values = values.into_iter();
        match values.next().unwrap_or(Value::Nil) {
            Value::Boolean(true) => {
                // `on_auth` may name the uid: `return true, "uid"`.
                let allowed = match (hook, values.next()) {
                    (Hook::Auth, Some(Value::String(uid))) => Some(uid.to_string_lossy()),
                    _ => rewritten,
                };
                return Outcome {
                    decision: Decision::Allow(allowed),
                    failures,
                    passed: false,
                };
            }
            Value::Boolean(false) => {
                let reason = match values.next() {
                    Some(Value::String(reason)) => reason.to_string_lossy(),
                    _ => format!("denied by {name}"),
                };
                let reason = crate::text::clean(&reason, MAX_REASON);
                return deny(Decision::Deny(reason), failures);
            }
            Value::Nil => {}
            Value::Table(returned) if matches!(hook, Hook::Message | Hook::Push) => {
                match rewrite(&returned) {
                    Ok(new) => match argument.raw_set("text", new.as_str()) {
                        Ok(()) => rewritten = Some(new),
                        Err(e) => {
                            return unanswered(
                                settings.on_error,
                                FailureKind::Runtime,
                                e.to_string(),
                            )
                        }
                    },
                    Err(error) => {
                        failures.push(Failure {
                            script: name.to_owned(),
                            kind: FailureKind::BadReturn,
                            error,
                        });
                        if settings.on_error == OnError::Deny {
                            return deny(on_error(OnError::Deny, name), failures);
                        }
                    }
                }
            }
            other => {
                failures.push(Failure {
                    script: name.to_owned(),
                    kind: FailureKind::BadReturn,
                    error: format!(
                        "{} returned {}; expected true, false and a reason, nil{}",
                        hook.name(),
                        other.type_name(),
                        if matches!(hook, Hook::Message | Hook::Push) {
                            " or a table of fields"
                        } else {
                            ""
                        }
                    ),
                });
                if settings.on_error == OnError::Deny {
                    return deny(on_error(OnError::Deny, name), failures);
                }
            }
        }
    }
    Outcome {
        decision: Decision::Allow(rewritten),
        failures,
        passed: true,
    }
}

fn deny(decision: Decision, failures: Vec<Failure>) -> Outcome {
    Outcome {
        decision,
        failures,
        passed: false,
    }
}

fn failure_kind(state: &State, _error: &mlua::Error) -> FailureKind {
    match state.meter.exhausted() {
        Some(Exhausted::Budget) => FailureKind::Budget,
        Some(Exhausted::Deadline) => FailureKind::Deadline,
        None => FailureKind::Runtime,
    }
}

/// The fields a hook's argument holds.
fn fields(state: &State, input: &Input) -> mlua::Result<Table> {
    match input {
        Input::Message(message) => state.message_fields.call::<Table>((
            message.from.as_str(),
            message.to.as_str(),
            message.chat_type,
            message.group.as_deref(),
            message.text.as_deref(),
            message.media_url.as_deref(),
            message.msg_id.as_str(),
            message.client_id.as_str(),
            message.conversation.as_str(),
        )),
        Input::Connect(client) => {
            let table = state.lua.create_table()?;
            table.set("uid", client.uid.as_str())?;
            table.set("client_id", client.client_id.as_str())?;
            table.set("username", client.username.as_deref())?;
            table.set("protocol", client.protocol)?;
            table.set("clean_session", client.clean_session)?;
            table.set("keep_alive", client.keep_alive)?;
            Ok(table)
        }
        Input::Subscribe(subscription) => {
            let table = state.lua.create_table()?;
            table.set("uid", subscription.uid.as_str())?;
            table.set("client_id", subscription.client_id.as_str())?;
            table.set("filter", subscription.filter.as_str())?;
            table.set("qos", subscription.qos)?;
            Ok(table)
        }
        Input::Publish(publish) => {
            let table = state.lua.create_table()?;
            table.set("uid", publish.uid.as_str())?;
            table.set("client_id", publish.client_id.as_str())?;
            table.set("topic", publish.topic.as_str())?;
            table.set("qos", publish.qos)?;
            table.set("retain", publish.retain)?;
            table.set("payload", state.lua.create_string(&publish.payload)?)?;
            Ok(table)
        }
        Input::Push(push) => {
            let table = state.lua.create_table()?;
            table.set("uid", push.uid.as_str())?;
            table.set("client_id", push.client_id.as_str())?;
            table.set("app_id", push.app_id.as_str())?;
            table.set("conversation", push.conversation.as_str())?;
            table.set("from", push.from.as_deref())?;
            table.set("text", push.text.as_deref())?;
            table.set("unread", push.unread)?;
            table.set("format", push.format.as_str())?;
            Ok(table)
        }
        Input::Auth(auth) => {
            let table = state.lua.create_table()?;
            table.set("client_id", auth.client_id.as_str())?;
            table.set("username", auth.username.as_deref())?;
            let password = auth.password.as_deref().map(|p| state.lua.create_string(p));
            table.set("password", password.transpose()?)?;
            table.set("peer", auth.peer.as_str())?;
            table.set("protocol", auth.protocol)?;
            table.set("transport", auth.transport)?;
            Ok(table)
        }
    }
}

/// The text a rewrite table sets; only `text` may be rewritten.
fn rewrite(fields: &Table) -> Result<String, String> {
    let mut text = None;
    for pair in fields.pairs::<Value, Value>() {
        let (key, value) = pair.map_err(|e| e.to_string())?;
        match (key, value) {
            (Value::String(key), Value::String(value)) if key.to_string_lossy() == "text" => {
                text = Some(value.to_string_lossy());
            }
            (key, _) => {
                return Err(format!(
                    "a rewrite may only set `text` (a string), got {}",
                    crate::text::clean(
                        &key.to_string()
                            .unwrap_or_else(|_| key.type_name().to_owned()),
                        64
                    )
                ))
            }
        }
    }
    text.ok_or_else(|| "a rewrite table must set `text`".to_owned())
}

#[async_trait]
impl Policy for LuaPolicy {
    async fn on_message(&self, message: MessageView) -> Decision {
        self.run(Input::Message(message)).await
    }

    async fn on_connect(&self, client: ClientView) -> Decision {
        self.run(Input::Connect(client)).await
    }

    async fn on_subscribe(&self, subscription: SubscribeView) -> Decision {
        self.run(Input::Subscribe(subscription)).await
    }

    fn checks_publishes(&self) -> bool {
        let workers = self.workers.read().unwrap_or_else(PoisonError::into_inner);
        workers.serves[Hook::Publish.index()]
    }

    async fn on_publish(&self, publish: PublishView) -> Decision {
        self.run(Input::Publish(publish)).await
    }

    fn checks_pushes(&self) -> bool {
        let workers = self.workers.read().unwrap_or_else(PoisonError::into_inner);
        workers.serves[Hook::Push.index()]
    }

    async fn on_push(&self, push: PushView) -> Decision {
        self.run(Input::Push(push)).await
    }

    async fn on_auth(&self, credentials: AuthView) -> AuthDecision {
        let hook = Hook::Auth;
        let outcome = self.run_outcome(Input::Auth(credentials)).await;
        match outcome.decision {
            _ if outcome.passed => AuthDecision::Next,
            Decision::Allow(uid) => AuthDecision::Allow { uid },
            Decision::Deny(reason) => {
                tracing::debug!(hook = hook.name(), %reason, "login refused by a script");
                AuthDecision::Deny
            }
        }
    }
}
