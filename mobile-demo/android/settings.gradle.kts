// The nextquill demo app. Open this folder in Android Studio after
// ../build-android.sh has built the native libraries and copied the assets.
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}
dependencyResolutionManagement {
    repositories {
        google()
        mavenCentral()
    }
}
rootProject.name = "NextQuillDemo"
include(":app")
