import pytest

from configs import evf_sam
from evf_jax.evf import EvfConfig


@pytest.mark.parametrize("preset", evf_sam.PRESETS)
def test_config_round_trips_to_the_model_config(preset):
  cfg = evf_sam.get_config(preset)
  assert evf_sam.model_config(cfg) == EvfConfig.preset(preset)


def test_config_rejects_unknown_fields():
  cfg = evf_sam.get_config("tiny")
  cfg.model.sam.unknown_field = 1
  with pytest.raises(ValueError, match="unknown"):
    evf_sam.model_config(cfg)
