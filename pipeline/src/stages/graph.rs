//! The stage graph of a config: which stages run, in which order, what each reads, and their
//! chained fingerprints. Built from the configured sections alone: a stage is in the graph when
//! its section is, and its optional upstream stages are wired in when theirs are (no topology
//! flags are passed to the stages).

use super::{
    AnnotateStage, CODE_VERSION, Fingerprint, IngestStage, RouteStage, ScoreStage, Stage, SynthesizeStage, TagStage,
    TokenizeStage, UnitStage, Upstream, hash,
};
use crate::config::Config;
use crate::engine::run_dir::RunDir;
use crate::error::{Error, Result};
use crate::pack::PackStage;
use std::sync::Arc;

/// How the runner drives a stage.
#[derive(Clone)]
pub enum Scope {
    /// Once per work unit of the plan, each unit committed on its own under a lease.
    Unit(Arc<dyn UnitStage>),
    /// Once over every unit's committed upstream results, when they are all current, its work
    /// split over the ranks; one completion record (the pack manifest, [`crate::pack`]).
    Global,
}

/// One stage in the graph.
#[derive(Clone)]
pub struct Node {
    pub stage: Arc<dyn Stage>,
    pub scope: Scope,
    /// The stages it reads in this graph, in its declared order: the required ones and the
    /// optional ones that are configured.
    pub upstream: Vec<&'static str>,
}

impl Node {
    pub fn name(&self) -> &'static str {
        self.stage.name()
    }
}

/// The configured stages in dependency order.
#[derive(Clone)]
pub struct StageGraph {
    pub nodes: Vec<Node>,
}

fn unit(stage: impl UnitStage + 'static) -> (Arc<dyn Stage>, Scope) {
    let stage: Arc<dyn UnitStage> = Arc::new(stage);
    (stage.clone(), Scope::Unit(stage))
}

/// The config section that puts `stage` in the graph.
fn section(stage: &str) -> String {
    match stage {
        "ingest" => "[[inputs]]".into(),
        "route" | "tag" => format!("[{stage}] (always present)"),
        "annotate" | "synthesize" => format!("[{stage}] and [llm]"),
        other => format!("[{other}]"),
    }
}

impl StageGraph {
    /// The stages of `config`: `ingest`, `route` and `tag` always; `score`, `annotate`,
    /// `synthesize`, `tokenize` and `pack` when the config has their sections. A stage that
    /// needs one that is not configured is a config error naming the section to add.
    pub fn new(config: &Arc<Config>) -> Result<StageGraph> {
        let mut stages = vec![unit(IngestStage::new(config.clone()))];
        if let Some(settings) = &config.score {
            stages.push(unit(ScoreStage::new(settings.clone())));
        }
        if let (Some(llm), Some(settings)) = (&config.llm, &config.annotate) {
            stages.push(unit(AnnotateStage::new(llm.clone(), settings.clone())));
        }
        stages.push(unit(RouteStage::new(config.clone())));
        if let (Some(llm), Some(settings)) = (&config.llm, &config.synthesize) {
            stages.push(unit(SynthesizeStage::new(llm.clone(), settings.clone())));
        }
        stages.push(unit(TagStage::new(config.clone())));
        if let Some(settings) = &config.tokenize {
            stages.push(unit(TokenizeStage::new(settings.clone())));
        }
        if let Some(settings) = &config.pack {
            stages.push((Arc::new(PackStage::new(settings.clone())), Scope::Global));
        }
        let mut nodes: Vec<Node> = Vec::new();
        for (stage, scope) in stages {
            let mut upstream = Vec::new();
            for read in stage.reads() {
                let present = nodes.iter().any(|n| n.name() == read.stage());
                match (read, present) {
                    (_, true) => upstream.push(read.stage()),
                    (Upstream::Optional(_), false) => {}
                    (Upstream::Required(up), false) => {
                        return Err(Error::Config(format!(
                            "{}: the {} stage reads the output of {up}, which is not configured: add {}",
                            config.path.display(),
                            stage.name(),
                            section(up)
                        )));
                    }
                }
            }
            nodes.push(Node { stage, scope, upstream });
        }
        Ok(StageGraph { nodes })
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.nodes.iter().map(Node::name).collect()
    }

    pub fn position(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name() == name)
    }

    /// Every stage's fingerprint, in graph order; `plan` is the work plan's fingerprint. Loads
    /// the model identities the settings hold (a missing model file is an error).
    pub fn fingerprints(&self, plan: &str) -> Result<Vec<Fingerprint>> {
        let settings = self
            .nodes
            .iter()
            .map(|n| Ok(hash(&n.stage.settings()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(self.chain(plan, &settings))
    }

    /// Like [`StageGraph::fingerprints`], for commands that only look (`status`, `sql`): a stage
    /// whose settings cannot be read now (its model file is missing) takes the settings
    /// fingerprint of its last committed result, and a note says so. That assumes the model
    /// did not change; `run` never does this.
    pub async fn fingerprints_or_recorded(
        &self,
        plan: &str,
        run_dir: &RunDir,
    ) -> Result<(Vec<Fingerprint>, Vec<String>)> {
        let mut settings = Vec::new();
        let mut notes = Vec::new();
        for node in &self.nodes {
            match node.stage.settings() {
                Ok(value) => settings.push(hash(&value)),
                Err(e) => {
                    let recorded = match node.scope {
                        Scope::Unit(_) => run_dir
                            .stage(node.name())
                            .await?
                            .done
                            .into_values()
                            .max_by(|a, b| a.record.finished_at.cmp(&b.record.finished_at))
                            .map(|c| c.record.stamp.settings_fingerprint),
                        Scope::Global => crate::pack::load_manifest(run_dir)
                            .await?
                            .manifest()
                            .map(|m| m.stamp.settings_fingerprint.clone()),
                    };
                    let Some(recorded) = recorded else {
                        return Err(e);
                    };
                    notes.push(format!(
                        "{}: {e}; judged with the settings of its last committed result (as if the model were unchanged)",
                        node.name()
                    ));
                    settings.push(recorded);
                }
            }
        }
        Ok((self.chain(plan, &settings), notes))
    }

    /// Chains settings fingerprints (in graph order) into stage fingerprints.
    fn chain(&self, plan: &str, settings: &[String]) -> Vec<Fingerprint> {
        let mut out: Vec<Fingerprint> = Vec::new();
        for (node, settings) in self.nodes.iter().zip(settings) {
            let upstream: Vec<&str> = node
                .upstream
                .iter()
                .map(|name| {
                    let i = self.position(name).expect("resolved when the graph was built");
                    out[i].stage.as_str()
                })
                .collect();
            let chained = serde_json::json!([node.name(), CODE_VERSION, settings, plan, upstream]);
            let stage = hash(&chained);
            out.push(Fingerprint {
                settings: settings.clone(),
                stage,
            });
        }
        out
    }

    /// Checks the stage names given to `--force` (a stage of this graph, or `all`).
    pub fn check_names(&self, names: &[String]) -> Result<()> {
        let known = self.names();
        match names.iter().find(|n| *n != "all" && !known.contains(&n.as_str())) {
            Some(name) => Err(Error::Config(format!(
                "--force {name}: no such stage; stages are {known:?} (or 'all')"
            ))),
            None => Ok(()),
        }
    }

    /// `names` plus every stage downstream of them (for `--force`).
    pub fn downstream_closure(&self, names: &[String]) -> Vec<&'static str> {
        let mut chosen: Vec<&'static str> = Vec::new();
        for node in &self.nodes {
            let forced = names.iter().any(|n| n == node.name() || n == "all");
            let below = node.upstream.iter().any(|up| chosen.contains(up));
            if forced || below {
                chosen.push(node.name());
            }
        }
        chosen
    }
}
