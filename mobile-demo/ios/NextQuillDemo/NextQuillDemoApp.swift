// The iOS demo app's entry point.
import SwiftUI

@main
struct NextQuillDemoApp: App {
    @StateObject private var model = DemoModel()

    var body: some Scene {
        WindowGroup { ContentView(model: model) }
    }
}
