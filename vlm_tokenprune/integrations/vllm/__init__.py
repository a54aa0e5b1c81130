"""The vLLM plugin: serve pre-LLM visual-token reductions in vLLM 0.32 (``pip install "vlm_tokenprune[vllm]"``).

``plugin.register`` is the ``vllm.general_plugins`` entry point; ``policy_source`` says where the policy
comes from (``hf_overrides={"vtp_policy": ...}`` or ``$VTP_POLICY``); ``servable`` decides what vLLM can
serve and reduces one image's features with the library's criterion code; ``models_*`` subclass vLLM's
model classes. Importing this package imports no vLLM; ``import vlm_tokenprune`` never imports it.
"""
