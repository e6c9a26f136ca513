"""The app's screens: the chat, and modal dialogs returning typed results."""
