"""CSS shared by the chat and the admin console (passed to `gr.mount_gradio_app`)."""

CSS = """
.gradio-container { max-width: 920px !important; margin: 0 auto !important; }
.gc-header { font-size: 1.15rem; padding: 4px 2px; }
.gc-header .gc-sub { font-size: 0.85rem; opacity: 0.75; margin-top: 2px; }
.gc-badge { display: inline-block; padding: 3px 10px; border-radius: 999px; font-size: 0.85rem;
  font-weight: 600; margin-bottom: 6px; }
.gc-blocked { background: #fde8e8; color: #9b1c1c; border: 1px solid #f8b4b4; }
.gc-error { background: #fff4e5; color: #8a4b00; border: 1px solid #f6c88f; border-radius: 8px; }
.gc-citations { margin-top: 6px; font-size: 0.88rem; }
.gc-citations .gc-label { font-weight: 600; opacity: 0.8; }
.gc-citation summary, .gc-why summary { cursor: pointer; }
.gc-citation blockquote { margin: 4px 0 6px 8px; padding-left: 8px; border-left: 3px solid #c7d2fe;
  white-space: pre-wrap; }
.gc-source { font-size: 0.8rem; opacity: 0.7; }
.gc-why { margin-top: 6px; font-size: 0.82rem; }
.gc-why table { border-collapse: collapse; display: block; overflow-x: auto; }
.gc-why td, .gc-why th { padding: 2px 6px; border: 1px solid #e5e7eb; }
.gc-trace { max-height: 240px; overflow: auto; font-size: 0.75rem; white-space: pre-wrap; }
#gc-send { min-width: 64px; }
.gc-session { font-size: 0.75rem; opacity: 0.6; text-align: center; }
/* Phones (~375 px): no side gutters, the input row stays on one line, tables scroll. */
@media (max-width: 480px) {
  .gradio-container { padding: 4px !important; }
  #gc-input-row { flex-wrap: nowrap !important; gap: 6px; }
  .gc-header .gc-sub { display: none; }
}
"""
