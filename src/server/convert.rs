//! Wire messages to plain domain types: enum integers are checked here, everything else in `validate`.
use super::pb;
use crate::tokenizer::Truncation;
use crate::validate::{GenerateParams, PredictParams, ValidationError};

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
        max_new_tokens: req.max_new_tokens,
        temperature: sampling.temperature,
        top_k: sampling.top_k,
        top_p: sampling.top_p,
        repetition_penalty: sampling.repetition_penalty,
        seed: sampling.seed,
        stop: req.stop,
        logprobs: req.logprobs,
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
    fn unspecified_direction_keeps_the_start() {
        let req = pb::PredictRequest { inputs: vec!["a".into()], truncate: true, ..Default::default() };
        assert_eq!(predict_params(req).unwrap().direction, Truncation::Right);
    }
}
