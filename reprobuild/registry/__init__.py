"""OCI registries (OCI Distribution Specification v1.1): references, credentials, a small HTTP
client, and the layout reprobuild pushes (artifact and referrer manifests, the fallback tag)."""
