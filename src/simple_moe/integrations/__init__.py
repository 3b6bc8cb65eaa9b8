"""Adapters that plug simple_moe into other libraries. Each submodule imports its library lazily: importing `simple_moe` (or this
package) never imports them. Available: `simple_moe.integrations.transformers` (Hugging Face transformers >= 5)."""
