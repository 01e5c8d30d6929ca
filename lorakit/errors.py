"""One family of errors, so callers can catch lorakit's complaints apart from bugs."""


class LorakitError(ValueError):
    """Bad input to lorakit; the message names what is wrong and how to fix it."""


class ConfigError(LorakitError):
    """A LoraConfig or adapter_config.json value that cannot be used."""


class TargetError(LorakitError):
    """target_modules / target_parameters that do not fit the model."""


class AdapterFileError(LorakitError):
    """An adapter folder or file that cannot be read, or does not fit the base model."""


class AdapterNameError(ConfigError):
    """An adapter name that cannot be a folder name or a module key."""
