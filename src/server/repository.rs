//! Triton's model repository extension of the Open Inference Protocol (RepositoryIndex,
//! RepositoryModelLoad, RepositoryModelUnload): requests parsed into the registry's calls, states
//! named as Triton names them.
use std::collections::HashMap;

use super::oip::pb;
use super::status::ServeError;
use crate::registry::{IndexState, Registry};
use crate::validate::ValidationError;
use pb::model_repository_parameter::ParameterChoice;

type Params = HashMap<String, pb::ModelRepositoryParameter>;

fn invalid(field: &str, expected: &str, got: String) -> ValidationError {
    ValidationError::Tensor { field: field.to_string(), expected: expected.to_string(), got }
}

/// What a load or unload request asks for, checked.
#[derive(Debug, PartialEq, Eq)]
struct Args {
    version: Option<u64>,
    canary_percent: Option<u8>,
}

fn args(params: &Params, accepted: &[&str]) -> Result<Args, ValidationError> {
    if let Some(k) = params.keys().find(|k| !accepted.contains(&k.as_str())) {
        // Triton's "config" and "file:" overrides among them: omnibus takes settings from its flags
        // and models from its directory only.
        return Err(invalid("parameters", &format!("only {}", accepted.join(", ")), format!("{k:?}")));
    }
    let choice = |k: &str| params.get(k).and_then(|p| p.parameter_choice.as_ref());
    let version = match choice("version") {
        None => None,
        Some(ParameterChoice::Int64Param(v)) if *v > 0 => Some(*v as u64),
        Some(ParameterChoice::StringParam(s)) if s.parse::<u64>().is_ok_and(|v| v > 0) => s.parse().ok(),
        Some(other) => {
            return Err(invalid("parameters.version", "a version number (1, 2, ...)", format!("{other:?}")));
        }
    };
    let canary_percent = match choice("canary_percent") {
        None => None,
        Some(ParameterChoice::Int64Param(p)) if (1..=99).contains(p) => Some(*p as u8),
        Some(ParameterChoice::StringParam(s)) if s.parse::<u8>().is_ok_and(|p| (1..=99).contains(&p)) => s.parse().ok(),
        Some(other) => {
            return Err(invalid("parameters.canary_percent", "an integer from 1 to 99", format!("{other:?}")));
        }
    };
    Ok(Args { version, canary_percent })
}

fn model_name(name: &str) -> Result<&str, ValidationError> {
    if name.is_empty() {
        return Err(invalid("model_name", "the name of a model in the repository", "an empty name".into()));
    }
    Ok(name)
}

pub(super) async fn index(
    registry: &Registry,
    req: pb::RepositoryIndexRequest,
) -> Result<pb::RepositoryIndexResponse, ServeError> {
    let models = registry
        .index()
        .await?
        .into_iter()
        .filter(|e| !req.ready || e.state == IndexState::Ready)
        .map(|e| pb::repository_index_response::ModelIndex {
            name: e.name,
            version: e.version.to_string(),
            state: match e.state {
                IndexState::Ready => "READY",
                IndexState::Unloading => "UNLOADING",
                IndexState::Unavailable => "UNAVAILABLE",
            }
            .into(),
            reason: e.reason,
        })
        .collect();
    Ok(pb::RepositoryIndexResponse { models })
}

pub(super) async fn load(
    registry: &Registry,
    req: pb::RepositoryModelLoadRequest,
) -> Result<pb::RepositoryModelLoadResponse, ServeError> {
    let name = model_name(&req.model_name)?;
    let a = args(&req.parameters, &["version", "canary_percent"])?;
    registry.load_version(name, a.version, a.canary_percent).await?;
    Ok(pb::RepositoryModelLoadResponse {})
}

pub(super) async fn unload(
    registry: &Registry,
    req: pb::RepositoryModelUnloadRequest,
) -> Result<pb::RepositoryModelUnloadResponse, ServeError> {
    let name = model_name(&req.model_name)?;
    // Triton clients send unload_dependents; there are no ensembles here, so it changes nothing.
    let a = args(&req.parameters, &["version", "unload_dependents"])?;
    registry.unload(name, a.version).await?;
    Ok(pb::RepositoryModelUnloadResponse {})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(c: ParameterChoice) -> pb::ModelRepositoryParameter {
        pb::ModelRepositoryParameter { parameter_choice: Some(c) }
    }

    #[test]
    fn load_parameters_are_parsed_or_named_in_the_error() {
        let ok = |params: Vec<(&str, ParameterChoice)>| {
            let params: Params = params.into_iter().map(|(k, c)| (k.to_string(), p(c))).collect();
            args(&params, &["version", "canary_percent"])
        };
        assert_eq!(ok(vec![]).unwrap(), Args { version: None, canary_percent: None });
        assert_eq!(
            ok(vec![
                ("version", ParameterChoice::StringParam("3".into())),
                ("canary_percent", ParameterChoice::Int64Param(10))
            ])
            .unwrap(),
            Args { version: Some(3), canary_percent: Some(10) }
        );
        assert_eq!(ok(vec![("version", ParameterChoice::Int64Param(2))]).unwrap().version, Some(2));
        let err = ok(vec![("version", ParameterChoice::StringParam("v2".into()))]).unwrap_err().to_string();
        assert!(err.contains("parameters.version") && err.contains("v2"), "{err}");
        let err = ok(vec![("canary_percent", ParameterChoice::Int64Param(100))]).unwrap_err().to_string();
        assert!(err.contains("1 to 99") && err.contains("100"), "{err}");
        let err = ok(vec![("config", ParameterChoice::StringParam("{}".into()))]).unwrap_err().to_string();
        assert!(err.contains("\"config\"") && err.contains("version, canary_percent"), "{err}");
        assert!(model_name("").is_err());
    }
}
