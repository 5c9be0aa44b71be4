//! Wire messages to plain domain types: enum integers are checked here, everything else in `validate`.
use super::pb;
use crate::batcher::Priority;
use crate::tokenizer::Truncation;
use crate::validate::{GenerateParams, PredictParams, ValidationError};

/// The metadata header that sets the priority when the request's field does not.
pub const PRIORITY_HEADER: &str = "x-omnibus-priority";

/// The call's scheduling class: the request field, else the header, else interactive.
pub fn priority(field: i32, metadata: &tonic::metadata::MetadataMap) -> Result<Priority, ValidationError> {
    match pb::Priority::try_from(field) {
        Ok(pb::Priority::Interactive) => return Ok(Priority::Interactive),
        Ok(pb::Priority::Batch) => return Ok(Priority::Batch),
        Ok(pb::Priority::Unspecified) => {}
        Err(_) => return Err(ValidationError::UnknownEnum { field: "priority", value: field }),
    }
    match metadata.get(PRIORITY_HEADER).map(|v| v.to_str().map(str::to_ascii_lowercase)) {
        None => Ok(Priority::Interactive),
        Some(Ok(v)) if v == "interactive" => Ok(Priority::Interactive),
        Some(Ok(v)) if v == "batch" => Ok(Priority::Batch),
        Some(v) => Err(ValidationError::BadHeader {
            header: PRIORITY_HEADER,
            expected: "interactive or batch",
            got: v.unwrap_or_else(|_| "non-ASCII bytes".into()),
        }),
    }
}
pub fn predict_params(req: pb::PredictRequest) -> Result<PredictParams, ValidationError> {
    let direction = match pb::TruncationDirection::try_from(req.truncation_direction) {
        Ok(pb::TruncationDirection::Unspecified | pb::TruncationDirection::Right) => Truncation::Right,
        Ok(pb::TruncationDirection::Left) => Truncation::Left,
        Err(_) => {
            return Err(ValidationError::UnknownEnum {
                field: "truncation_direction",
                value: req.truncation_direction,
            });
        }
    };
    Ok(PredictParams { inputs: req.inputs, truncate: req.truncate, direction, normalize: req.normalize })
}

pub fn generate_params(req: pb::GenerateRequest) -> GenerateParams {
    let sampling = req.sampling.unwrap_or_default();
    GenerateParams {
        prompt: req.prompt,
        messages: req.messages.into_iter().map(|m| (m.role, m.content)).collect(),
        max_new_tokens: req.max_new_tokens.into(),
        temperature: sampling.temperature,
        top_k: sampling.top_k,
        top_p: sampling.top_p,
        repetition_penalty: sampling.repetition_penalty,
        seed: sampling.seed,
        stop: req.stop,
        logprobs: req.logprobs,
        prompt_logprobs: req.prompt_logprobs,
        top_logprobs: req.top_logprobs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_enum_values_are_named() {
        let req = pb::PredictRequest { inputs: vec!["a".into()], truncation_direction: 7, ..Default::default() };
        let err = predict_params(req).unwrap_err();
        assert_eq!(err, ValidationError::UnknownEnum { field: "truncation_direction", value: 7 });
        assert_eq!(err.to_string(), "truncation_direction: unknown enum value 7");
    }

    #[test]
    fn priority_from_field_then_header() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert_eq!(priority(0, &md).unwrap(), Priority::Interactive);
        md.insert(PRIORITY_HEADER, "Batch".parse().unwrap());
        assert_eq!(priority(0, &md).unwrap(), Priority::Batch);
        assert_eq!(priority(pb::Priority::Interactive as i32, &md).unwrap(), Priority::Interactive);
        md.insert(PRIORITY_HEADER, "urgent".parse().unwrap());
        let err = priority(0, &md).unwrap_err();
        assert_eq!(err.to_string(), "x-omnibus-priority: expected interactive or batch, got \"urgent\"");
        assert_eq!(priority(9, &md).unwrap_err(), ValidationError::UnknownEnum { field: "priority", value: 9 });
    }

    #[test]
    fn unspecified_direction_keeps_the_start() {
        let req = pb::PredictRequest { inputs: vec!["a".into()], truncate: true, ..Default::default() };
        assert_eq!(predict_params(req).unwrap().direction, Truncation::Right);
    }
}
