"""PEFT methods: a config and the injection of its layers into a model, per method."""
