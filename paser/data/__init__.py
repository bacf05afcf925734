"""Phase 1, data: instruction pools in the layouts users bring (Alpaca, LaMini, Dolly, chat turns,
ShareGPT, mapped fields), the capability suite paser generates with exact answers, and the prompt
template that scoring and recovery share. Imports only what every phase uses (errors, progress)."""
