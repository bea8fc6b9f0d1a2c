from .config import LoraConfig
from .layer import LoraLayer, ModulesToSaveWrapper
from .model import LoraModel

__all__ = ["LoraConfig", "LoraLayer", "LoraModel", "ModulesToSaveWrapper"]
