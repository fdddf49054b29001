"""The model: frozen backbones, the MSE-Adapter, the prompt and the recognizer that joins them."""

from tracker.model.adapter import AdapterConfig, ModalityConfig, MSEAdapter
from tracker.model.backbone import Backbone, load_backbone
from tracker.types import Turn, UtteranceInput
from tracker.model.prompt import PromptBuilder, PromptConfig
from tracker.model.recognizer import EmotionRecognizer, Prediction, RecognizerConfig

__all__ = [
    "AdapterConfig", "ModalityConfig", "MSEAdapter", "Backbone", "load_backbone", "Turn", "UtteranceInput",
    "PromptBuilder", "PromptConfig", "EmotionRecognizer", "Prediction", "RecognizerConfig",
]
